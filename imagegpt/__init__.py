"""The library of imagegpt-tokens (the commands at the top level of the repository call it)."""
