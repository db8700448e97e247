"""Named limits on everything a caller can send or make the engine hold."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Limits:
    # A basket larger than this is a bulk import, not an order; ask for ExecuteBatch.
    lines_per_reservation_max: int = 100
    # Bounded so one batch decides in well under a millisecond per 100 commands and its
    # response stays far below gRPC's 4 MiB default message size.
    commands_per_batch_max: int = 1_000
    # A single line above a million units is a typo, not an order.
    quantity_max: int = 1_000_000
    # On-hand per position; 10^12 leaves every sum of positions far inside int64.
    on_hand_max: int = 1_000_000_000_000
    request_id_length_max: int = 128
    reservation_id_length_max: int = 64
    sku_length_max: int = 64
    location_length_max: int = 64
    channel_length_max: int = 64
    order_ref_length_max: int = 128
    source_length_max: int = 64
    # A sentence or two for the operator who reads it later.
    reason_length_max: int = 500
    # A preference list longer than this is a scan of the network, not a preference.
    locations_per_line_max: int = 32
    # Stock messages per call, like batch commands.
    adjustments_per_request_max: int = 1_000
    skus_per_availability_query_max: int = 1_000
    # Channel figures per counted position in an ERP snapshot: more channels than this
    # selling one sku at one location is a misconfigured feed, not a business.
    channels_per_count_max: int = 64
    page_size_default: int = 100
    page_size_max: int = 1_000
    # Pending holds: long enough for a checkout with payment redirects, short enough
    # that abandoned carts give stock back soon.
    ttl_default_s: int = 900
    ttl_min_s: int = 1
    # A week: longer holds should be confirmed instead.
    ttl_max_s: int = 7 * 24 * 3600
    # Continuity controls are for incidents and events: a month at most, so that a
    # forgotten one does not quietly outlive its reason.
    control_duration_max_s: int = 31 * 24 * 3600
    # A throttle above this is no throttle at all for one server.
    throttle_rate_max_per_s: int = 100_000
