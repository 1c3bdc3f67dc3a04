"""VeLO weights made by velo_scale's own meta-training (see params.json)."""
