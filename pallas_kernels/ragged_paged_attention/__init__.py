from .reference import ragged_paged_attention_reference, token_layout, write_kv

__all__ = ["ragged_paged_attention_reference", "token_layout", "write_kv"]
