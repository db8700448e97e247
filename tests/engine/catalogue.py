"""The small world the randomized engine-vs-model sequences play in: the skus,
locations, channels and actors their commands name, and the limits the engine runs
with.

A small catalogue, so that lines compete for the same positions. The unknown sku and
location are never stocked, and the unknown group is never defined.
"""

from server.engine.limits import Limits

LIMITS = Limits()

SKUS = ("sku-a", "sku-b", "sku-c", "sku-d")
LOCATIONS = ("loc-1", "loc-2", "loc-3")
POSITIONS = tuple((sku, location) for sku in SKUS for location in LOCATIONS)
UNKNOWN_SKU = "sku-unstocked"
UNKNOWN_LOCATION = "loc-unstocked"
CHANNELS = ("web", "app")
# What GetAvailability and the at-risk listing can be asked for: every channel (""),
# or one channel.
VIEWS = ("", *CHANNELS)
SOURCES = ("erp", "pos")
ACTORS = ("ops", "planner")
# Three groups, so that a channel can source from one while another is removed, and
# one sku's allocations can be scoped to two groups that share no location.
GROUPS = ("near", "far", "mid")
UNKNOWN_GROUP = "group-undefined"
# Every (sku, channel) whose reach and allocations left are compared after each step.
PAIRS = [(sku, channel) for sku in SKUS for channel in CHANNELS]
# The locations a channel's reach is asked for, one per step in turn: every location
# (none named), then subsets that cut across the groups the generator tends to draw.
REACH_SUBSETS = (
    (),
    (LOCATIONS[0],),
    (LOCATIONS[1], LOCATIONS[2]),
    (LOCATIONS[0], LOCATIONS[2]),
    (LOCATIONS[0], LOCATIONS[1]),
)
