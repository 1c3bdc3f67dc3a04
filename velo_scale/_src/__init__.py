"""Implementation of velo_scale. Import from `velo_scale`, not from here."""
