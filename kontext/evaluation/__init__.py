"""Judging generated images against the insertion mask: metrics, generating and scoring one sample (``score``),
image grids with the mask outlined, bar charts.

A library: validation during training, the ``evaluate`` command and the tiny model's pretraining recipe use it.
"""
