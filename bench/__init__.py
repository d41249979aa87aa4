"""`make bench`: Tuneboard's measured speed against the tutorial's recipe, on this machine."""
