"""Test-only stand-in for torchaudio, first on PYTHONPATH in tests/callbacks/test_llamafactory.py (nowhere else).

LLaMA-Factory imports torchaudio unconditionally (llamafactory/data/mm_plugin.py) but uses it only to read
audio inputs. The torchaudio that pip resolves for it from the registry is built for another torch and does
not load beside torch 2.13.0 (`OSError: Could not load this library: .../_torchaudio.so`), so the import of
llamafactory fails before any training. The tests train on text only: this module lets the import succeed,
and any real use of audio fails loudly instead of silently doing something else.
"""

__version__ = "0.0.0+guardian-test-stub"


def __getattr__(name: str) -> object:
    raise ImportError(f"torchaudio is a test stub (tests/stubs/torchaudio): torchaudio.{name} is not available")
