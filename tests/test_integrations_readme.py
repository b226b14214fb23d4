"""The README's "Where you already train" snippets run as written (in a scratch directory, on the CPU)."""
import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")


def snippet(title: str) -> str:
    """The first python block under '### {title}' of the README's 'Where you already train' section."""
    text = README.read_text()
    section = text[text.index("## Where you already train"):]
    section = section[:section.index("\n## ", 1)]
    part = section[section.index(f"### {title}"):]
    return re.search(r"```python\n(.*?)```", part, re.S).group(1)


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pytest.importorskip("accelerate", reason="needs accelerate (pip install 'mixprec[accelerate]')")
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield tmp_path
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.parametrize("title,host", [("Lightning: Trainer and Fabric", "lightning"),
                                        ("Hugging Face Trainer", "transformers"),
                                        ("accelerate", "accelerate"),
                                        ("torchtitan-style scripts", None)])
def test_readme_snippet_runs(title, host, scratch):
    if host is not None and importlib.util.find_spec(host) is None:
        pytest.skip(f"needs {host} (pip install 'mixprec[{host}]')")
    namespace = {"__name__": "readme"}
    exec(compile(snippet(title), f"README.md ({title})", "exec"), namespace)
    if host == "lightning":
        from mixprec.integrations.lightning import MixprecPrecision
        plugin, loaded = namespace["plugin"], MixprecPrecision("fp16-mixed")
        namespace["fabric"].load("fabric.ckpt", {"mixprec": loaded})       # the scale comes back
        assert loaded.scaler.state_dict() == plugin.scaler.state_dict() and plugin.scaler.is_enabled()
    elif host == "transformers":
        logs = [h for h in namespace["trainer"].state.log_history if "loss" in h]
        assert logs and all("loss_scale" in h for h in logs)
    elif host == "accelerate":
        assert namespace["loss_scaler"](namespace["optimizer"]).get_scale() > 1
