"""Annotation web app: annotators rank K responses per prompt; raw rankings stored and exported."""
