"""The DPO family (llmjax.train.dpo): each formula against numbers computed here by hand, the
policy = reference invariants, the gradient's direction, and step-1 metrics equal to TRL 1.16's
(tests/golden/dpo, made by tools/make_dpo_goldens.py) on the same two tiny Llamas and token
ids, unpacked (one pair per row) and packed (two and three pairs per row, one slot empty)."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.errors import ConfigError
from llmjax.interop import load_hf
from llmjax.models import Transformer
from llmjax.train import dpo, losses

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden', 'dpo')


def logsig(x):
  return -math.log1p(math.exp(-x))


def cfg_of(loss, **kw):
  return dpo.DPOConfig(loss=loss, **kw)


# One pair by hand: policy/ref summed log-probs and completion token counts.
PC, PR, RC, RR, NC, NR = -4.0, -7.0, -5.0, -6.5, 4.0, 6.0
DELTA = (PC - RC) - (PR - RR)  # 1.0 - (-0.5) = 1.5


def by_hand(loss, beta, e=0.0, gamma=0.0):
  if loss == 'sigmoid':
    return -logsig(beta * DELTA)
  if loss == 'hinge':
    return max(0.0, 1.0 - beta * DELTA)
  if loss == 'ipo':
    return ((PC - RC) / NC - (PR - RR) / NR - 1.0 / (2 * beta)) ** 2
  if loss == 'robust':
    return ((1 - e) * -logsig(beta * DELTA) - e * -logsig(-beta * DELTA)) / (1 - 2 * e)
  if loss == 'sigmoid_norm':
    return -logsig(beta * ((PC - RC) / NC - (PR - RR) / NR))
  if loss == 'simpo':
    z = beta * (PC / NC - PR / NR) - gamma
    return -(1 - e) * logsig(z) - e * logsig(-z)
  if loss == 'orpo':
    ac, ar = PC / NC, PR / NR
    log_odds = math.log(math.exp(ac) / (1 - math.exp(ac))) - math.log(math.exp(ar) / (1 - math.exp(ar)))
    return -beta * logsig(log_odds)
  raise KeyError(loss)


@pytest.mark.parametrize('loss,kw', [
    ('sigmoid', {}), ('hinge', {}), ('hinge', {'beta': 0.9}), ('ipo', {}),
    ('robust', {'label_smoothing': 0.2}), ('sigmoid_norm', {}),
    ('simpo', {'simpo_gamma': 0.3, 'label_smoothing': 0.1}), ('orpo', {})])
def test_each_pair_loss_equals_its_formula_by_hand(loss, kw):
  beta = kw.pop('beta', 0.3)
  cfg = cfg_of(loss, beta=beta, **kw)
  got, cr, rr = dpo.pair_losses(jnp.array([PC]), jnp.array([PR]), jnp.array([RC]),
                                jnp.array([RR]), jnp.array([NC]), jnp.array([NR]), cfg)
  want = by_hand(loss, beta, kw.get('label_smoothing', 0.0), kw.get('simpo_gamma', 0.0))
  np.testing.assert_allclose(float(got[0]), want, rtol=1e-6)
  if cfg.uses_reference:  # TRL's rewards: beta x summed log-ratio, whatever the loss
    np.testing.assert_allclose([float(cr[0]), float(rr[0])], [beta * 1.0, beta * -0.5], rtol=1e-6)
  else:  # reference-free: beta x mean token log-prob
    np.testing.assert_allclose([float(cr[0]), float(rr[0])], [beta * -1.0, beta * -7 / 6],
                               rtol=1e-6)


def test_robust_without_smoothing_is_sigmoid_and_hinge_is_zero_past_the_margin():
  args = [jnp.array([x]) for x in (PC, PR, RC, RR, NC, NR)]
  robust = dpo.pair_losses(*args, cfg_of('robust', beta=0.3))[0]
  sig = dpo.pair_losses(*args, cfg_of('sigmoid', beta=0.3))[0]
  np.testing.assert_allclose(robust, sig, rtol=1e-6)
  assert float(dpo.pair_losses(*args, cfg_of('hinge', beta=1.0))[0][0]) == 0.0  # 1 - 1.5 < 0


def test_kto_by_hand_with_kl_clamped_and_not():
  cfg = cfg_of('kto', beta=0.5, desirable_weight=1.5, undesirable_weight=0.5)
  policy, ref = jnp.array([-3.0, -8.0]), jnp.array([-4.0, -7.0])  # log-ratios +1, -1
  label = jnp.array([1.0, 0.0])
  # KL completions: policy - ref = +0.4 and +0.2 -> z = 0.3; then -0.4, -0.2 -> clamped to 0.
  for kl_pol, kl_ref, z in (([-1.0, -2.0], [-1.4, -2.2], 0.3), ([-1.4, -2.2], [-1.0, -2.0], 0.0)):
    kl = dpo.kto_kl(jnp.array(kl_pol), jnp.array(kl_ref), jnp.ones(2))
    np.testing.assert_allclose(float(kl), z, atol=1e-6)
    loss, rewards = dpo.kto_losses(policy, ref, kl, label, cfg)
    sig = lambda x: 1 / (1 + math.exp(-x))
    want = [1.5 * (1 - sig(0.5 * (1 - z))), 0.5 * (1 - sig(0.5 * (z + 1)))]
    np.testing.assert_allclose(np.asarray(loss), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(rewards), [0.5, -0.5], rtol=1e-6)
  # Not differentiated: the gradient through z is zero.
  g = jax.grad(lambda p: dpo.kto_kl(p, jnp.array([-1.4, -2.2]), jnp.ones(2)))(jnp.array([-1., -2.]))
  assert np.all(np.asarray(g) == 0)


def test_sigmoid_gradient_raises_chosen_and_lowers_rejected():
  cfg = cfg_of('sigmoid', beta=0.3)
  f = lambda pc, pr: dpo.pair_losses(pc, pr, jnp.float32(RC), jnp.float32(RR), NC, NR, cfg)[0]
  gc, gr = jax.grad(f, argnums=(0, 1))(jnp.float32(PC), jnp.float32(PR))
  assert gc < 0 < gr  # descent raises log pi(chosen), lowers log pi(rejected)
  s = 1 / (1 + math.exp(0.3 * DELTA))  # d/d pc of -log sigmoid(beta delta) = -beta sigmoid(-beta delta)
  np.testing.assert_allclose([float(gc), float(gr)], [-0.3 * s, 0.3 * s], rtol=1e-5)


# ---- configs --------------------------------------------------------------------------

@pytest.mark.parametrize('kw,match', [
    ({'loss': 'sigmod'}, "Did you mean 'sigmoid'"),
    ({'loss': 'dpo'}, "dpo.loss='dpo' is not one of"),
    ({'beta': 0.0}, 'dpo.beta=0.0 must be > 0'),
    ({'beta': float('nan')}, 'dpo.beta=nan must be a finite number'),
    ({'loss': 'robust', 'label_smoothing': 0.5}, r'must be in \[0, 0.5\)'),
    ({'label_smoothing': 0.1}, "only applies to dpo.loss in"),
    ({'loss': 'simpo', 'simpo_gamma': -1.0}, 'dpo.simpo_gamma=-1.0 must be >= 0'),
    ({'loss': 'kto', 'undesirable_weight': 0.0}, 'dpo.undesirable_weight=0.0 must be > 0'),
    ({'sft_weight': -0.1}, 'dpo.sft_weight=-0.1 must be >= 0'),
    ({'beta': 'big'}, "dpo.beta='big' must be a finite number"),
])
def test_bad_config_values_are_one_line_config_errors(kw, match):
  with pytest.raises(ConfigError, match=match) as e:
    dpo.DPOConfig.from_config(kw)
  assert '\n' not in str(e.value)


def test_from_config_reads_the_known_keys_and_defaults():
  cfg = dpo.DPOConfig.from_config({'loss': 'robust', 'beta': 0.3, 'label_smoothing': 0.1,
                                   'ref_hf_dir': '/elsewhere'})  # other keys are not ours
  assert (cfg.loss, cfg.beta, cfg.label_smoothing, cfg.sft_weight) == ('robust', 0.3, 0.1, 0.0)
  assert dpo.DPOConfig().beta == 0.1 and dpo.DPOConfig().loss == 'sigmoid'
  assert not dpo.DPOConfig(loss='simpo').uses_reference and dpo.DPOConfig(loss='kto').uses_reference


@pytest.mark.parametrize('loss,fmt', [('kto', 'preference'), ('sigmoid', 'unpaired_preference'),
                                      ('orpo', 'text')])
def test_data_format_mismatch_is_a_one_line_config_error(loss, fmt):
  with pytest.raises(ConfigError, match=f"dpo.loss='{loss}' needs data.format") as e:
    dpo.check_data_format(loss, fmt)
  assert '\n' not in str(e.value)
  dpo.check_data_format('kto', 'unpaired_preference')
  dpo.check_data_format('sigmoid', 'preference')


# ---- batches from TRL's token ids ------------------------------------------------------

def segment(doc, weights):
  """A document's tokens and per-token weights -> (inputs, targets, loss_mask) as the
  pipeline builds them: the weight of predicting token i+1 is weights[i+1]."""
  doc = np.asarray(doc, np.int32)
  return doc[:-1], doc[1:], np.asarray(weights[1:], np.float32)


def pack(rows_of_segments, pairs_per_row, length, pair_masks, extra=None):
  """Rows of segment lists -> a batch dict of the preference contract."""
  b = len(rows_of_segments)
  batch = {k: np.zeros((b, length), np.int32) for k in ('inputs', 'targets', 'segment_ids',
                                                        'positions')}
  batch['loss_mask'] = np.zeros((b, length), np.float32)
  for r, segs in enumerate(rows_of_segments):
    t = 0
    for s, (x, y, w) in enumerate(segs):
      n = len(x)
      batch['inputs'][r, t:t + n], batch['targets'][r, t:t + n] = x, y
      batch['loss_mask'][r, t:t + n] = w
      batch['segment_ids'][r, t:t + n] = s + 1
      batch['positions'][r, t:t + n] = np.arange(n)
      t += n
    assert t <= length
  batch['pair_mask'] = np.asarray(pair_masks, np.float32).reshape(b, pairs_per_row)
  for k, v in (extra or {}).items():
    batch[k] = np.asarray(v, np.float32).reshape(b, pairs_per_row)
  return batch


def examples_of(run):
  """TRL's ids -> per example (first segment, second segment[, label])."""
  ids = run['ids']
  if run['trainer'] == 'DPOTrainer':
    out = []
    for p, c, r in zip(ids['prompt_ids'], ids['chosen_ids'], ids['rejected_ids']):
      w = lambda comp: [0.0] * len(p) + [1.0] * len(comp)
      out.append((segment(p + c, w(c)), segment(p + r, w(r))))
    return out, None
  if run['trainer'] == 'KTOTrainer':
    out = []
    for p, c, k in zip(ids['prompt_ids'], ids['completion_ids'], ids['KL_completion_ids']):
      out.append((segment(p + c, [0.0] * len(p) + [1.0] * len(c)),
                  segment(p + k, [0.0] * len(p) + [1.0] * len(k))))
    return out, [float(x) for x in ids['label']]
  out = []  # CPO / ORPO: full sequences and labels (-100 on the prompt)
  for c, cl, r, rl in zip(ids['chosen_input_ids'], ids['chosen_labels'],
                          ids['rejected_input_ids'], ids['rejected_labels']):
    out.append((segment(c, [float(l != -100) for l in cl]),
                segment(r, [float(l != -100) for l in rl])))
  return out, None


def make_batch(run, pairs_per_row, length=256):
  examples, labels = examples_of(run)
  n = len(examples)
  rows, masks, lab = [], [], []
  for start in range(0, n, pairs_per_row):
    chunk = examples[start:start + pairs_per_row]
    rows.append([s for ex in chunk for s in ex])
    masks += [1.0] * len(chunk) + [0.0] * (pairs_per_row - len(chunk))
    if labels is not None:
      lab += labels[start:start + len(chunk)] + [0.0] * (pairs_per_row - len(chunk))
  return pack(rows, pairs_per_row, length, masks, {'label': lab} if labels else None)


@pytest.fixture(scope='module')
def golden():
  with open(os.path.join(GOLDEN, 'golden.json')) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def models():
  out = {}
  for name in ('policy', 'ref'):
    cfg, params, _ = load_hf(os.path.join(GOLDEN, name), max_seq_len=256)
    out[name] = params
  model = Transformer(cfg)
  out['apply_fn'] = lambda p, x, **kw: model.apply({'params': p}, x, **kw)
  return out


# Our config for each golden run (TRL's arguments in golden.json).
RUNS = {
    'sigmoid': dict(loss='sigmoid'),
    'hinge': dict(loss='hinge'),
    'ipo': dict(loss='ipo'),
    'robust': dict(loss='robust', label_smoothing=0.1),
    'sigmoid_norm': dict(loss='sigmoid_norm'),
    'rpo': dict(loss='sigmoid', sft_weight=0.5),
    'simpo': dict(loss='simpo', simpo_gamma=0.7),
    'simpo_nll_smooth': dict(loss='simpo', simpo_gamma=0.7, sft_weight=0.4, label_smoothing=0.1),
    'orpo': dict(loss='orpo'),
    'kto': dict(loss='kto', desirable_weight=1.3, undesirable_weight=0.7),
    'kto_swapped': dict(loss='kto', desirable_weight=1.3, undesirable_weight=0.7),
}
# TRL's CPO/ORPO `logits/*` average the padded [batch, length, vocab] logits (prompt and padding
# included): no packing-independent quantity, so not compared (llmjax uses DPO's definition).
# CPO logs nll_loss = 0 when cpo_alpha = 0; llmjax logs the chosen NLL always.
NOT_COMPARED = {'simpo': ('logits/chosen', 'logits/rejected', 'nll_loss'),
                'simpo_nll_smooth': ('logits/chosen', 'logits/rejected'),
                'orpo': ('logits/chosen', 'logits/rejected')}


def step_metrics(run, kw, models, pairs_per_row, loss_chunk=0, batch=None):
  cfg = dpo.DPOConfig(beta=0.3, **kw)
  loss_fn = dpo.make_loss_fn(cfg, num_pairs=pairs_per_row, loss_chunk=loss_chunk)
  policy, ref = (models['ref'], models['policy']) if run['policy'] == 'ref' else (
      models['policy'], models['ref'])
  batch = batch if batch is not None else make_batch(run, pairs_per_row)
  out = jax.jit(lambda p, b, r: loss_fn(p, b, models['apply_fn'], r))(
      policy, batch, ref if cfg.uses_reference else None)
  return dpo.derived_metrics(cfg, losses.reduce_output(out)), out


# Every run packed (P=2); unpacked (P=1) once per TRL trainer (DPO: sigmoid, KTO: kto,
# CPO: simpo and orpo): packing is the loss-independent sequence_logprobs layout, so P=1 of the
# other DPO losses would check the same layout again. P=3 (one slot empty) for a paired and an
# unpaired loss (test_masked_pair_slots_contribute_nothing covers more with P=3).
UNPACKED = ('sigmoid', 'kto', 'simpo', 'orpo')


@pytest.mark.parametrize('name,pairs_per_row', [(n, 2) for n in RUNS]
                         + [(n, 1) for n in UNPACKED] + [('sigmoid', 3), ('kto_swapped', 3)])
def test_step1_metrics_equal_trl(golden, models, name, pairs_per_row):
  run = golden['runs'][name]
  got, out = step_metrics(run, RUNS[name], models, pairs_per_row)
  assert float(out.weight) == 8  # the 8 real pairs/examples; 3 per row leaves one slot empty
  want = dict(run['metrics'])
  np.testing.assert_allclose(want['loss'], run['compute_loss'], rtol=1e-6)
  compared = [k for k in want if k not in NOT_COMPARED.get(name, ()) and k in got]
  missing = {k for k in want if k not in got}  # every metric TRL logs, by TRL's name
  assert not missing, missing
  for k in compared:
    np.testing.assert_allclose(float(got[k]), want[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_policy_equal_to_reference_gives_zero_rewards_and_log_2(golden, models):
  run = dict(golden['runs']['sigmoid'], policy='policy')
  m = {'policy': models['policy'], 'ref': models['policy'], 'apply_fn': models['apply_fn']}
  got, _ = step_metrics(run, dict(loss='sigmoid'), m, 2)
  for k in ('rewards/chosen', 'rewards/rejected', 'rewards/margins'):
    assert abs(float(got[k])) < 1e-6, k
  np.testing.assert_allclose(float(got['loss']), math.log(2), rtol=1e-6)
  assert float(got['rewards/accuracies']) == 0  # ties are not accurate (TRL: chosen > rejected)


def test_precomputed_ref_logps_and_loss_chunk_give_the_same_output(golden, models):
  run = golden['runs']['robust']
  kw = RUNS['robust']
  batch = make_batch(run, 2)
  base, _ = step_metrics(run, kw, models, 2, batch=batch)
  ref_lp, _ = losses.sequence_logprobs(models['ref'], batch, models['apply_fn'], num_segments=4)
  pre, _ = step_metrics(run, kw, dict(models, ref=None), 2, batch=dict(batch, ref_logps=ref_lp))
  chunked, _ = step_metrics(run, kw, models, 2, loss_chunk=16, batch=batch)
  for k in base:
    np.testing.assert_allclose(float(pre[k]), float(base[k]), rtol=1e-6, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(float(chunked[k]), float(base[k]), rtol=1e-5, atol=1e-6,
                               err_msg=k)


@pytest.mark.parametrize('name', ['sigmoid', 'orpo'])
def test_masked_pair_slots_contribute_nothing(golden, models, name):
  """A pair in a slot whose pair_mask is 0 changes no number; an empty slot gives finite
  gradients (orpo's log(1 - exp(mean logp)) is -inf on an empty slot's 0 / 1)."""
  run = golden['runs'][name]
  batch = make_batch(run, 3)  # row 3 holds pairs 7 and 8, slot 3 empty
  full, _ = step_metrics(run, RUNS[name], models, 3, batch=batch)
  loss_fn = dpo.make_loss_fn(dpo.DPOConfig(beta=0.3, **RUNS[name]), num_pairs=3)
  grads = jax.jit(jax.grad(lambda p: loss_fn(p, batch, models['apply_fn'], models['ref']).total))(
      models['policy'])
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  # Put pair 1 again into the empty slot's segments (5, 6) of the last row, masked.
  ex = examples_of(run)[0][0]
  t = int(np.sum(batch['segment_ids'][2] > 0))
  for s, (x, y, w) in zip((5, 6), ex):
    n = len(x)
    for key, v in (('inputs', x), ('targets', y), ('loss_mask', w)):
      batch[key][2, t:t + n] = v
    batch['segment_ids'][2, t:t + n] = s
    batch['positions'][2, t:t + n] = np.arange(n)
    t += n
  masked, _ = step_metrics(run, RUNS[name], models, 3, batch=batch)
  for k in full:
    np.testing.assert_allclose(float(masked[k]), float(full[k]), rtol=1e-6, err_msg=k)


def test_a_gradient_step_on_the_model_raises_chosen_and_lowers_rejected(golden, models):
  run = golden['runs']['sigmoid']
  cfg = dpo.DPOConfig(loss='sigmoid', beta=0.3)
  loss_fn = dpo.make_loss_fn(cfg, num_pairs=1)
  batch = make_batch(run, 1)

  @jax.jit
  def step(p):
    out, grads = jax.value_and_grad(
        lambda q: loss_fn(q, batch, models['apply_fn'], models['ref']).total / 8)(p)
    lp, _ = losses.sequence_logprobs(p, batch, models['apply_fn'], 2)
    return out, lp, jax.tree.map(lambda x, g: x - 1e-2 * g, p, grads)

  loss0, before, stepped = step(models['policy'])
  loss1, after, _ = step(stepped)
  assert float(jnp.sum(after[:, 0] - before[:, 0])) > 0  # chosen up
  assert float(jnp.sum(after[:, 1] - before[:, 1])) < 0  # rejected down
  assert float(loss1) < float(loss0)


def test_reference_loss_without_reference_is_an_error(golden, models):
  loss_fn = dpo.make_loss_fn(dpo.DPOConfig(), num_pairs=1)
  with pytest.raises(ValueError, match='needs a reference'):
    loss_fn(models['policy'], make_batch(golden['runs']['sigmoid'], 1), models['apply_fn'])


def test_grad_accum_4_gives_the_grad_accum_1_update(golden, models, name='sigmoid'):
  """8 pairs as one batch or as 4 micro-batches of 2 rows: the same metrics and the same
  updated weights (every pair term is a sum over pairs, divided once by the pair count)."""
  import optax
  from llmjax.train.state import TrainState
  from llmjax.train.step import make_train_step
  run = golden['runs'][name]
  loss_fn = dpo.make_loss_fn(dpo.DPOConfig(beta=0.3, **RUNS[name]), num_pairs=1)
  batch = make_batch(run, 1, length=96)  # the longest pair has 84 tokens
  out = {}
  for accum in (1, 4):
    opt = optax.sgd(0.1)
    state = TrainState.create(models['policy'], opt, jax.random.key(0))
    step = jax.jit(make_train_step(models['apply_fn'], loss_fn, opt, grad_accum=accum))
    out[accum] = step(state, batch, models['ref'])
  (s1, m1), (s4, m4) = out[1], out[4]
  for k in m1:
    np.testing.assert_allclose(float(m4[k]), float(m1[k]), rtol=2e-5, atol=1e-6, err_msg=k)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), s1.params, models['policy'])
  assert max(jax.tree.leaves(moved)) > 1e-6  # the step changed the weights
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
