"""Vibration evidence drawn for people: the envelope spectrum of a bearing event as a PNG."""
