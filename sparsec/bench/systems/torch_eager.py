"""PyTorch eager: Hugging Face ``generate`` on the variant's model, as users run it."""

from __future__ import annotations

import time

from sparsec.bench.systems.base import Sample, System


class TorchEagerSystem(System):
    engine = "torch"
    weights_format = "fp32 (torch.nn.Linear)"

    def __init__(self, variant):
        super().__init__(variant, "torch eager fp32")
        import torch
        import transformers

        self.version = f"{torch.__version__} (transformers {transformers.__version__})"

    def _load(self, threads: int) -> None:
        pass  # torch.set_num_threads is global: set before every run

    def run(self, prompt: list[int], new_tokens: int) -> Sample:
        import torch
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):
            """Timestamps every token generate() emits (the prompt comes first)."""

            def __init__(self):
                self.times: list[float] = []
                self.tokens: list[int] = []
                self.prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                self.times.append(time.perf_counter())
                self.tokens += value.reshape(-1).tolist()

            def end(self):
                pass

        torch.set_num_threads(self.threads)
        model = self.variant.model
        clock = Clock()
        ids = torch.tensor([prompt])
        with torch.no_grad():
            t0 = time.perf_counter()
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,  # no early stop at eos: same work as the others
                do_sample=False,
                pad_token_id=0,
                streamer=clock,
            )
        return Sample(
            clock.times[0] - t0,
            clock.times[-1] - clock.times[0],
            len(clock.times) - 1,
            clock.tokens,
        )

    def weight_bytes_per_token(self) -> int:
        import torch

        linears = sum(
            m.weight.numel() * m.weight.element_size()
            for m in self.variant.model.modules()
            if isinstance(m, torch.nn.Linear)
        )
        return linears + 4 * self.variant.config.hidden_size
