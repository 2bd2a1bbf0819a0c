"""Small models trained here, their training scripts, and what those share with the tests."""
