"""Starting recipe processes: a supervisor that restarts crashed runs from their last checkpoint."""
