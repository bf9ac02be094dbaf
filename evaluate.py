"""Evaluate a checkpoint per expert prompt. Not wired up yet (issue 6)."""
import sys

if __name__ == "__main__":
    sys.exit("evaluate.py: evaluation is not implemented yet (see issue 6).")
