"""`python -m mil_experiments`: see `mil_experiments.run.main`."""

from mil_experiments.run import main

if __name__ == "__main__":
    main()
