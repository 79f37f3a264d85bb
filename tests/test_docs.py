"""The code the docs show runs as shown."""

import os
import re

from tests.conftest import REPO


def _python_blocks(path):
  with open(os.path.join(REPO, path)) as f:
    return re.findall(r'```python\n(.*?)```', f.read(), re.S)


def test_the_training_guides_script_runs(tmp_path, mnist_dir, capsys):
  (block,) = [b for b in _python_blocks('docs/training.md') if 'train_and_evaluate' in b]
  scope = {'DATA_DIR': mnist_dir, 'WORKDIR': str(tmp_path / 'run')}
  exec(compile(block, 'docs/training.md', 'exec'), scope)  # noqa: S102
  assert re.search(r'loss \d+\.\d{3}, accuracy \d\.\d\d', capsys.readouterr().out)
  assert scope['record']['epoch'] == 1 and 0 <= scope['record']['test_accuracy'] <= 1
  assert sorted(os.listdir(tmp_path / 'run')) == ['checkpoints', 'curves.png', 'metrics.jsonl',
                                                 'run.json']
