"""The text-conditional noise magnitude and everything built on it."""
