"""What a trained run does: what capsules encode (interpret), its scores on a file (evaluate)."""
