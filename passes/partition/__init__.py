"""Placement passes: split a graph between devices (edge and cloud) at the cut the cost
model finds fastest for the link, chosen per call by the measured bandwidth."""
from pared.passes.partition import partition  # noqa: F401
