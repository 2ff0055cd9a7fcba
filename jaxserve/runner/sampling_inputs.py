"""Host-side packing of per-sequence SamplingState into the sampler's padded numpy arrays."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np



# Fixed width of the per-row (token id, bias) list: logit_bias entries plus banned tokens
# (EOS / stop ids under min_tokens). A fixed width keeps the sampler's shapes static.
MAX_BIAS_ENTRIES = 128


# The fields that travel packed into one int32 vector (all 4-byte types, bit-cast), in this
# order, as (name, dtype, width per row: 1, "W" = MAX_BIAS_ENTRIES or "L" = the penalty history);
# `counters` travels alone, since a decode block's sub-steps change only it.
PACKED_FIELDS = (("temperature", "float32", 1), ("top_k", "int32", 1), ("top_p", "float32", 1),
                 ("min_p", "float32", 1), ("seeds", "uint32", 1), ("presence", "float32", 1),
                 ("frequency", "float32", 1), ("repetition", "float32", 1), ("bias_ids", "int32", "W"),
                 ("bias_vals", "float32", "W"), ("prompt_ids", "int32", "L"), ("output_ids", "int32", "L"))


@dataclass
class SamplingBatch:
    arrays: dict  # field name of SamplingTensors -> numpy array
    penalties: bool  # static: compile the variant that builds token histograms
    # static: "greedy" (every row temperature 0), "random" (no top-k/top-p/min-p), "biased" (as
    # those, with logit_bias / banned tokens) or "filtered" (filters or penalties).
    # Chosen on the host so the device program has no data-dependent branch (an XLA conditional
    # on GPUs reads its predicate back to the host, stalling the dispatch of the next step).
    mode: str = "filtered"

    def packed(self) -> tuple[np.ndarray, np.ndarray]:
        """(every field but counters bit-cast to int32 and concatenated in PACKED_FIELDS order,
        counters [S]): two host-to-device transfers instead of thirteen; sampler.unpack_sampling
        takes them apart on the device."""
        flat = np.concatenate([np.ascontiguousarray(self.arrays[f]).view(np.int32).reshape(-1)
                               for f, _, _ in PACKED_FIELDS])
        return flat, self.arrays["counters"]


def pack_sampling(states: list, num_rows: int, history_len: int) -> SamplingBatch:
    """states[i] is row i's SamplingState (None for padding / non-sampling rows).
    history_len: width of the penalty token histories (max_model_len)."""
    S = num_rows
    temperature = np.zeros(S, np.float32)
    top_k = np.zeros(S, np.int32)
    top_p = np.ones(S, np.float32)
    min_p = np.zeros(S, np.float32)
    seeds = np.zeros(S, np.uint32)
    counters = np.zeros(S, np.int32)
    presence = np.zeros(S, np.float32)
    frequency = np.zeros(S, np.float32)
    repetition = np.ones(S, np.float32)
    bias_ids = np.full((S, MAX_BIAS_ENTRIES), -1, np.int32)
    bias_vals = np.zeros((S, MAX_BIAS_ENTRIES), np.float32)
    real = [(i, s) for i, s in enumerate(states) if s is not None]
    penalties = any(s.presence_penalty or s.frequency_penalty or s.repetition_penalty != 1.0
                    for _, s in real)
    L = history_len if penalties else 0
    prompt_ids = np.full((S, L), -1, np.int32)
    output_ids = np.full((S, L), -1, np.int32)
    for i, s in real:
        temperature[i] = s.temperature
        top_k[i] = s.top_k
        top_p[i] = s.top_p
        min_p[i] = s.min_p
        seeds[i] = s.seed & 0xFFFFFFFF
        counters[i] = s.num_output_tokens
        entries = dict(s.logit_bias or {})
        for t in s.banned_token_ids or ():
            entries[t] = -np.inf
        if len(entries) > MAX_BIAS_ENTRIES:
            raise ValueError(
                f"at most {MAX_BIAS_ENTRIES} logit_bias entries plus stop/EOS token ids per request, "
                f"got {len(entries)}")
        if entries:
            bias_ids[i, :len(entries)] = list(entries.keys())
            bias_vals[i, :len(entries)] = list(entries.values())
        if penalties:
            presence[i] = s.presence_penalty
            frequency[i] = s.frequency_penalty
            repetition[i] = s.repetition_penalty
            p = (s.prompt_token_ids or [])[:L]
            o = (s.output_token_ids or [])[:L]
            prompt_ids[i, :len(p)] = p
            output_ids[i, :len(o)] = o
    arrays = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seeds=seeds,
                  counters=counters, bias_ids=bias_ids, bias_vals=bias_vals,
                  presence=presence, frequency=frequency, repetition=repetition,
                  prompt_ids=prompt_ids, output_ids=output_ids)
    rand = [s for _, s in real if s.temperature > 0]
    if penalties or any(s.top_k > 0 or s.top_p < 1.0 or s.min_p > 0.0 for s in rand):
        mode = "filtered"  # (with penalties always: one variant fewer to compile)
    elif (bias_ids >= 0).any():
        mode = "biased"  # logit_bias or banned tokens (min_tokens): the scatter into the logits
    else:
        mode = "random" if rand else "greedy"
    return SamplingBatch(arrays, penalties, mode)
