"""The step census: its HLO reading, and its numbers against the cost model."""

import json

import pytest

from benchmarks import step_census

HLO = """\
HloModule jit_step, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%fused_add (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %add.1 = f32[8]{0} add(%p, %p)
}

ENTRY %main.7 (x.1: f32[8]) -> (f32[8], f32[]) {
  %x.1 = f32[8]{0} parameter(0)
  %constant.2 = f32[] constant(0)
  %add_fusion = f32[8]{0} fusion(%x.1), kind=kLoop, calls=%fused_add, CG
  %transpose_copy_fusion = f32[8]{0} fusion(%x.1), kind=kLoop, calls=%f
  %copy.9 = f32[8]{0} copy(%x.1)
  %conv.3 = (f32[8]{0}, u8[0]{0}) custom-call(%add_fusion), target="c"
  %gte = f32[8]{0} get-tuple-element(%conv.3), index=0
  %bitcast.4 = f32[2,4]{1,0} bitcast(%gte)
  %reduce.5 = f32[] reduce(%gte, %constant.2), dimensions={0}, to_apply=%f
  %cb = f32[8]{0} call(%x.1), to_apply=%command_buffer
  ROOT %tuple.6 = (f32[8]{0}, f32[]) tuple(%gte, %reduce.5)
}

%command_buffer (p.1: f32[8]) -> f32[8] {
  %p.1 = f32[8]{0} parameter(0)
  %f.1 = f32[8]{0} fusion(%p.1), kind=kLoop, calls=%fused_add
  ROOT %f.2 = f32[8]{0} fusion(%f.1), kind=kLoop, calls=%fused_add
}
""".replace('CG', 'metadata={op_name="jit(step)/frog_layer/frog_cg/add"}')


FOUND = step_census.instructions(HLO)


def test_kernel_counts_read_the_working_instructions_and_what_calls_run():
  assert step_census.kernel_counts(FOUND) == {
    'copy': 1,
    'custom-call': 1,
    'fusion': 4,
    'reduce': 1,
  }
  assert step_census.layout_kernels(FOUND) == 2
  parts = step_census.kernels_by_part(FOUND)
  assert parts['frog_cg'] == 1 and parts['frog_layer'] == 0
  assert parts['unlabelled'] == 6 and sum(parts.values()) == 7


@pytest.fixture(scope='module')
def result(tmp_path_factory):
  out = tmp_path_factory.mktemp('census') / 'census.json'
  argv = ['--net', 'convnet', '--batch', '16', '--samples', '4']
  argv += ['--cg-iters', '2', '--rounds', '1', '--out', str(out)]
  return step_census.main(argv), out


def test_the_census_is_written_with_ratios_to_sgd(result):
  result, out = result
  assert json.loads(out.read_text()) == result
  sgd = result['steps']['sgd']
  for step in result['steps'].values():
    for key, ratio in step['over_sgd'].items():
      assert ratio == pytest.approx(step[key] / sgd[key])
  assert '| frog |' in out.with_suffix('.md').read_text()


def test_frog_flops_follow_the_cost_model_and_its_kernels_do_not(result):
  result, _ = result
  steps = result['steps']
  # The capture adds no FLOPs; FROG adds the k CG iterations the cost model
  # counts (and a little more: the trace, the step normalisation).
  assert steps['capture_only']['over_sgd']['flops'] == pytest.approx(
    1, abs=0.02
  )
  frog = steps['frog']['over_sgd']
  assert result['cost_model'] <= frog['flops'] < result['cost_model'] + 0.1
  # Each CG iteration adds small kernels per layer beyond its convolutions.
  assert frog['kernels'] > frog['flops']
  assert steps['frog']['kernels'] > steps['capture_only']['kernels']


def test_frog_kernels_fall_into_its_named_parts(result):
  result, _ = result
  steps = result['steps']
  frog_parts = step_census.PARTS
  assert all(steps['sgd']['kernels_by_part'][p] == 0 for p in frog_parts)
  capture = steps['capture_only']['kernels_by_part']
  assert capture['frog_capture'] > 0 and capture['frog_cg'] == 0
  frog = steps['frog']['kernels_by_part']
  assert all(frog[p] > 0 for p in frog_parts)
  assert sum(frog.values()) == steps['frog']['kernels']
