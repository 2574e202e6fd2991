"""The deltamux server: one resident base model serving every task of a delta store over HTTP."""
