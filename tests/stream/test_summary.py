"""The run summary's "bound by" names where most of the wall time went, decoding and exports included."""

from arcstream.stream.loop import RunResult, Timings


def _result(**timings) -> RunResult:
    t = Timings(**timings).as_dict()
    return RunResult(output_dir="d", model="m", model_note="", sites=("blocks.0.hook_resid_post",),
                     stored_sites=(), steps=1, resumed_from=0, prompts=1, tokens=10, rows_durable=10, skips={},
                     seconds=sum(t.values()), timings=t, backpressure_waits=0, sae_steps=0, sae_final={},
                     exports=[])


def _row(result: RunResult, name: str) -> str:
    return dict(result.summary_rows())[name]


def test_bound_by_names_the_largest_stage_predictions_included():
    assert _row(_result(forward=11.2, sae=19.3, commit=4.2, predict=102.6), "time").endswith("bound by predictions")
    assert _row(_result(forward=50.0, sae=19.3, predict=10.0), "time").endswith("bound by forward")
    assert _row(_result(forward=5.0, finish=9.0), "time").endswith("bound by SAE exports")
    assert _row(_result(forward=5.0, analysis=9.0), "time").endswith("bound by analysis")
    assert (_row(_result(forward=1.0, finish=2.5, predict=102.6, analysis=7.25), "  exports / predict / analysis")
            == "2.5 s / 102.6 s / 7.2 s")
