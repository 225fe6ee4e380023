"""softlabels labeler: run a teacher over a corpus once and store its soft labels (Ray)."""
