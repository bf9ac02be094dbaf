"""Train with MEML-GRPO: stage 1 (MEF) then stage 2 (RIEL). Not wired up yet (issue 6)."""
import sys

if __name__ == "__main__":
    sys.exit("train.py: the training pipeline is not implemented yet (see issue 6).")
