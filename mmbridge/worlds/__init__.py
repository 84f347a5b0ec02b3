"""Synthetic visual worlds: procedurally drawn images whose every answer is derived from a symbolic scene.

``mmbridge.worlds.miniworld`` is the embedded world: shapes, colours, text, charts,
multi-image sets and short videos, with tasks and splits for training and evaluation.
"""
