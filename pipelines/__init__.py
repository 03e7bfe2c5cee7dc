"""Entry points run by MLproject and by hand: fit, evaluate, benchmark."""
