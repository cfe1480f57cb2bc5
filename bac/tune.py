"""``python -m bac.tune``: the same command as ``bac-tune`` (:mod:`bac.apps.tune`)."""
from bac.apps.tune import main

if __name__ == "__main__":
    main()
