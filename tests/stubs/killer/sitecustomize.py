"""Test-only: a SIGKILL in the middle of a real `llamafactory-cli train` (tests/test_llamafactory.py).

Put on the child's PYTHONPATH by that test only. `guardian run`'s own sitecustomize runs first and chains to this
one, which wraps the function that adds Guardian's callback to each Trainer so that a second callback kills the
process at the end of step GUARDIAN_TEST_KILL_STEP, in the first attempt only (GUARDIAN_RESTART=0): a crash that
LLaMA-Factory itself cannot be made to have on cue.
"""

import os

_step = int(os.environ.get("GUARDIAN_TEST_KILL_STEP") or 0)

if _step and os.environ.get("GUARDIAN_RESTART") == "0":
    import signal

    import guardian.inject as _inject

    _add = _inject.add_guardian

    def _add_guardian_and_killer(trainer):  # type: ignore[no-untyped-def]
        from transformers import TrainerCallback

        class _Kill(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                if state.global_step == _step:
                    os.kill(os.getpid(), signal.SIGKILL)

        _add(trainer)
        trainer.add_callback(_Kill())

    _inject.add_guardian = _add_guardian_and_killer
