"""Building a GOAL2K-style dataset: prompts, images, GroundingDINO boxes, human review (see README.md)."""
