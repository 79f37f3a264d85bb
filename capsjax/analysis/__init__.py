"""What a trained run does: capsule dimensions and couplings (interpret), scores on a file (evaluate)."""
