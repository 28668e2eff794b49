"""Dataset hook of offline task YAMLs: JSONL files named relative to this file's folder.

`pipeline.stage3_evaluate.tasks.write_task_dir` copies this file next to the task YAMLs it writes, with
the data under `data/`, and each offline YAML says

    custom_dataset: !function local_data.load
    dataset_kwargs: {data_files: {train: data/gsm8k.train.jsonl, test: data/gsm8k.jsonl}}

lm-eval resolves `!function` against the YAML's folder and calls
`load(**metadata, **dataset_kwargs)`, so the paths resolve against the task folder itself,
not the current directory (which is what `dataset_path: json` + `data_files` would do):
the folder can be moved or copied anywhere and read by lm-eval's own CLI
(`lm_eval --include_path FOLDER --tasks ...`). No hub access: the `json` builder ships with
`datasets`.
"""

from __future__ import annotations

from pathlib import Path


def load(data_files: dict[str, str], **_metadata):
    """{split: path relative to this file's folder (or absolute)} -> datasets.DatasetDict.

    `_metadata` takes what lm-eval passes besides dataset_kwargs (the task's `metadata`,
    `--metadata`, the model arguments, `config_source`).
    """
    import datasets

    here = Path(__file__).resolve().parent
    files: dict[str, str] = {}
    for split, name in data_files.items():
        path = Path(name) if Path(name).is_absolute() else here / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no such file (split {split!r} of a task YAML in {here}); the task "
                "folder must keep its data/ subfolder next to its YAMLs and local_data.py")
        files[split] = str(path)
    return datasets.load_dataset("json", data_files=files)
