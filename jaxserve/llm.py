"""The offline API: LLM(...).generate(...) / .chat(...), as vLLM users know it."""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from jaxserve.engine.gc_policy import quiet_gc
from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger("jaxserve")

PromptType = Union[str, list[int], dict]


class LLM:
    """An engine for offline batch generation.

    LLM()                                  # the embedded default model (SmolLM2-135M-Instruct)
    LLM("path/to/hf_dir" | "model.gguf" | "org/name in the local HF cache", dtype="bfloat16", ...)
    Keyword arguments are the engine's flat config names (max_model_len, max_num_seqs,
    block_size, gpu_memory_utilization, enable_prefix_caching, seed, ...). Left unset on an
    accelerator, max_num_seqs and max_num_batched_tokens take offline defaults (256 sequences;
    8192 tokens per step on 40+ GiB devices, 4096 on smaller ones): jaxserve/usage_defaults.py.
    """

    def __init__(self, model: Optional[str] = None, **kwargs: Any):
        from jaxserve.config import engine_config_from_kwargs
        from jaxserve.engine.dp_engine import make_engine
        from jaxserve.usage_defaults import OFFLINE, apply_usage_defaults

        _setup_logging()
        kwargs = apply_usage_defaults(kwargs, OFFLINE)  # bigger batches on large accelerators
        self.llm_engine = make_engine(engine_config_from_kwargs(model=model, **kwargs))
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    # ---- generation -------------------------------------------------------------------------
    def generate(
        self,
        prompts: Union[PromptType, Sequence[PromptType], None] = None,
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        *,
        prompt_token_ids: Optional[list[list[int]]] = None,
        use_tqdm: bool = True,
        priority: Optional[list[int]] = None,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a batch. A prompt is a string, a list of token ids, or a
        dict with "prompt" or "prompt_token_ids". Results come back in input order; a request
        that cannot be served (e.g. a prompt over max_model_len) comes back with `error` set and
        finish_reason "error" while the others complete."""
        items = _normalize_prompts(prompts, prompt_token_ids)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(items)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(items):
                raise ValueError(f"got {len(params_list)} SamplingParams for {len(items)} prompts")
        if priority is not None and len(priority) != len(items):
            raise ValueError(f"got {len(priority)} priorities for {len(items)} prompts")
        return self._run(items, params_list, priority, use_tqdm)

    def chat(
        self,
        messages: Union[list[dict], list[list[dict]]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        *,
        chat_template: Optional[str] = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (a list of {"role", "content"}) or
        a list of conversations, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [{"prompt_token_ids": self.llm_engine.apply_chat_template(
            c, add_generation_prompt=add_generation_prompt, chat_template=chat_template)} for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    # The collector stays quiet (engine/gc_policy.py) from the first add_request on: adding a
    # thousand requests allocates enough to trigger a full collection of the unfrozen heap (286 ms
    # on an H200 host, inside generate's wall time) before the stepping loop starts.
    @quiet_gc()
    def _run(self, items, params_list, priority, use_tqdm) -> list[RequestOutput]:
        eng = self.llm_engine
        results: dict[str, RequestOutput] = {}
        order = []
        for i, (item, params) in enumerate(zip(items, params_list)):
            rid = str(next(self._counter))
            order.append(rid)
            text, ids = item
            try:
                eng.add_request(rid, text, params, prompt_token_ids=ids,
                                priority=priority[i] if priority else 0, stream=False)
            except ValueError as e:
                logger.warning("request %d failed: %s", i, e)
                results[rid] = RequestOutput(
                    request_id=rid, prompt=text, prompt_token_ids=list(ids or []),
                    outputs=[CompletionOutput(index=0, text="", token_ids=[], finish_reason="error")],
                    finished=True, error=str(e))
        pbar = None
        if use_tqdm and len(order) > 1:
            from tqdm.auto import tqdm

            pbar = tqdm(total=len(order), desc="Processed prompts", dynamic_ncols=True)
            pbar.update(len(results))
        try:
            while eng.has_unfinished_requests():
                for out in eng.step():
                    if out.finished:
                        results[out.request_id] = out
                        if pbar is not None:
                            pbar.update(1)
        except BaseException:
            eng.abort_request([r for r in order if r not in results])
            raise
        finally:
            if pbar is not None:
                pbar.close()
        return [results[r] for r in order]

    def beam_search(self, prompts, params: BeamSearchParams, *, use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """Beam search, as vLLM's LLM.beam_search: every step extends each live beam by one token
        (its top 2 x beam_width continuations by logprob) and keeps the beam_width best by
        cumulative logprob (with length_penalty). Each beam is a request whose prompt is the beam's
        tokens so far, so beams share their common prefix through the prefix cache's reference
        counts instead of recomputing it. Returns, per prompt, the beams sorted best first."""
        eos = self.llm_engine.eos_token_ids
        W = params.beam_width
        step_params = SamplingParams(temperature=0, max_tokens=1, logprobs=min(2 * W, self.llm_engine.config.max_logprobs),
                                     ignore_eos=True, detokenize=False)
        results = []
        for text, ids in _normalize_prompts(prompts, None):
            if ids is None:
                ids = self.llm_engine.tokenizer.encode(text)
            live = [(list(ids), 0.0)]  # (tokens, cumulative logprob)
            done: list[tuple[list[int], float]] = []
            for _ in range(params.max_tokens):
                outs = self._run([(None, t) for t, _ in live], [step_params] * len(live), None, use_tqdm)
                cands = []
                for (toks, score), out in zip(live, outs):
                    if out.error:
                        raise ValueError(out.error)
                    for tid, lp in out.outputs[0].logprobs[0].items():
                        cands.append((toks + [tid], score + lp.logprob))
                cands.sort(key=lambda c: -c[1])
                live = []
                for toks, score in cands:
                    if not params.ignore_eos and toks[-1] in eos:
                        done.append((toks, score))
                    else:
                        live.append((toks, score))
                    if len(live) == W:
                        break
                if not live or len(toks) >= self.llm_engine.max_model_len:
                    break
            pool = done + live

            def rank(c):
                n_gen = len(c[0]) - len(ids)
                return c[1] / (max(n_gen, 1) ** params.length_penalty)

            pool.sort(key=rank, reverse=True)
            tok = self.llm_engine.tokenizer
            results.append(BeamSearchOutput(prompt_token_ids=list(ids), sequences=[
                BeamSequence(token_ids=t[len(ids):], cumulative_logprob=c,
                             text=tok.decode(t[len(ids):], skip_special_tokens=True)) for t, c in pool[:W]]))
        return results

    def get_stats(self):
        return self.llm_engine.get_stats()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (as vLLM's LLM.reset_prefix_cache), e.g. before timing a
        rerun of the same prompts; False, with nothing changed, while requests hold KV blocks."""
        return self.llm_engine.reset_prefix_cache()


@dataclass
class BeamSequence:
    token_ids: list[int]  # generated tokens
    cumulative_logprob: float
    text: str


@dataclass
class BeamSearchOutput:
    prompt_token_ids: list[int]
    sequences: list[BeamSequence]  # best first


def _normalize_prompts(prompts, prompt_token_ids) -> list[tuple[Optional[str], Optional[list[int]]]]:
    if prompt_token_ids is not None:
        return [(None, list(p)) for p in prompt_token_ids]
    if prompts is None:
        raise ValueError("give prompts (strings, token-id lists or dicts) or prompt_token_ids")
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                             and isinstance(prompts[0], int)):
        prompts = [prompts]
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append((p, None))
        elif isinstance(p, dict):
            if "prompt_token_ids" in p:
                out.append((p.get("prompt"), list(p["prompt_token_ids"])))
            elif "prompt" in p:
                out.append((p["prompt"], None))
            else:
                raise ValueError(f"a prompt dict needs 'prompt' or 'prompt_token_ids', got keys {list(p)}")
        elif isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p):
            out.append((None, list(p)))
        else:
            raise ValueError(f"unsupported prompt type {type(p).__name__}")
    return out


def _setup_logging() -> None:
    log = logging.getLogger("jaxserve")
    if not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(levelname)s %(asctime)s jaxserve: %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False
