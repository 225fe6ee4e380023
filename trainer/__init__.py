"""softlabels trainer: train students from stored soft labels (training never loads the teacher; no Ray)."""
