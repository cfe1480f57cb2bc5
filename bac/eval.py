"""``python -m bac.eval``: the main job, the same command as ``bac-eval`` (:mod:`bac.apps.eval`)."""
from bac.apps.eval import main

if __name__ == "__main__":
    main()
