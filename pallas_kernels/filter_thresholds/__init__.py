from .reference import INT32_MIN, filter_thresholds_reference, order_keys

__all__ = ["INT32_MIN", "filter_thresholds_reference", "order_keys"]
