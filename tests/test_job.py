import pytest

from recap.pipeline.job import JobError, apply_set, build_job, load_job


def _job(**over):
    data = {"name": "t", "seed": 1, "input": {"path": "urls.parquet"}, "output": "out",
            "download": {"samples_per_shard": 10}, "stages": [{"basic": {"min_caption_words": 2}}, "dedup"]}
    data.update(over)
    return data


def test_valid_job_resolves_every_stage_with_defaults():
    job = build_job(_job(), "j.yaml")
    assert [e.name for e in job.stages] == ["download", "basic", "dedup"]
    assert job.stages[0].config.samples_per_shard == 10
    assert job.stages[1].config.min_caption_words == 2
    resolved = job.resolved()
    assert resolved["stages"][1]["basic"]["min_caption_words"] == 2
    assert "timeout" in resolved["stages"][0]["download"]


@pytest.mark.parametrize("mutate, expect", [
    (lambda d: d.update(bogus=1), "j.yaml: bogus: unknown key (got 1)"),
    (lambda d: d["download"].update(timeout=-1), "j.yaml: download.timeout:"),
    (lambda d: d["download"].update(nope=True), "j.yaml: download.nope: unknown key"),
    (lambda d: d["stages"].append({"nosuch": {}}), "j.yaml: stages[2].nosuch: unknown stage 'nosuch'"),
    (lambda d: d["stages"][0]["basic"].update(min_caption_words="many"), "j.yaml: stages[0].basic.min_caption_words:"),
    (lambda d: d["input"].update(format="xls"), "j.yaml: input.format:"),
    (lambda d: d.pop("output"), "j.yaml: output: field required"),
    (lambda d: d["stages"].append("basic"), "appears twice"),
    (lambda d: d["stages"].append("download"), "cannot run here"),
])
def test_errors_name_file_field_and_value(mutate, expect):
    data = _job()
    mutate(data)
    with pytest.raises(JobError) as e:
        build_job(data, "j.yaml")
    assert expect in str(e.value)


def test_set_overrides_are_yaml_and_dotted(tmp_path):
    p = tmp_path / "job.yaml"
    import yaml
    p.write_text(yaml.safe_dump(_job()))
    job = load_job(p, ["download.allow_hosts=[127.0.0.1:8765, example.test]", "download.timeout=2.5",
                       "stages.0.basic.min_caption_words=5", "seed=7"], output=str(tmp_path / "o"))
    dl = job.stages[0].config
    assert dl.allow_hosts == ["127.0.0.1:8765", "example.test"] and dl.timeout == 2.5
    assert job.stages[1].config.min_caption_words == 5 and job.seed == 7
    assert job.output == str(tmp_path / "o")
    assert [e.name for e in load_job(p, ["stages=[]"]).stages] == ["download"]


def test_bad_set_and_bad_yaml(tmp_path):
    with pytest.raises(JobError, match="expected KEY=VALUE"):
        apply_set({}, "novalue", "x")
    with pytest.raises(JobError, match="not an index"):
        apply_set({"stages": []}, "stages.3.x=1", "x")
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(JobError, match=r"bad.yaml: not valid YAML"):
        load_job(p)
    with pytest.raises(JobError, match="cannot read job file"):
        load_job(tmp_path / "missing.yaml")
