"""DiTAS benchmarks: the maintained scripts (python bench/X.py) and the modules they share; bench/studies/ holds
the one-off studies."""
