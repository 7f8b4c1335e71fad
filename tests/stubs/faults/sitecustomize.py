"""Test-only: faults on cue inside a real `llamafactory-cli train` (tests/callbacks/test_llamafactory.py).

Put on the child's PYTHONPATH by that test only. `guardian run`'s own sitecustomize runs first and chains to this
one, which wraps the function that adds Guardian's callback to each Trainer so that a second callback, after
Guardian's, does what LLaMA-Factory itself cannot be made to do on cue, in the first attempt only
(GUARDIAN_RESTART=0):

* GUARDIAN_TEST_KILL_STEP=N: SIGKILL the process at the end of step N (a crash mid-training);
* GUARDIAN_TEST_CORRUPT_STEP=N: write inf into a LoRA weight at the end of step N (a bit flip, a bad all-reduce).
"""

import os

_kill = int(os.environ.get("GUARDIAN_TEST_KILL_STEP") or 0)
_corrupt = int(os.environ.get("GUARDIAN_TEST_CORRUPT_STEP") or 0)

if (_kill or _corrupt) and os.environ.get("GUARDIAN_RESTART") == "0":
    import signal

    import guardian.testing.inject as _inject

    _add = _inject.add_guardian

    def _add_guardian_and_fault(trainer):  # type: ignore[no-untyped-def]
        import torch
        from transformers import TrainerCallback

        class _Fault(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
                if state.global_step == _kill:
                    os.kill(os.getpid(), signal.SIGKILL)
                if state.global_step == _corrupt:
                    weight = next(p for n, p in model.named_parameters() if "lora_A" in n and p.requires_grad)
                    with torch.no_grad():
                        weight[0, :4] = float("inf")

        _add(trainer)
        trainer.add_callback(_Fault())

    _inject.add_guardian = _add_guardian_and_fault
