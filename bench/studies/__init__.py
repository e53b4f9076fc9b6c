"""One-off studies whose question is answered: each opens with its question and its answer, from its results file
in bench/results/."""
