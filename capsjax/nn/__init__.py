"""The network pieces: squash, routing by agreement, convolutions, capsule layers, losses."""
