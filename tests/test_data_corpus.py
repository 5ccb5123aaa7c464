"""Embedded corpus tests: deterministic, disjoint splits, and a world that never contradicts itself
(checked by parsing the generated text, not by reading the generator's tables)."""

import collections
import re
import time

import pytest

from llmjax.data import corpus, default_corpus
from llmjax.errors import DataError


def test_deterministic_fast_and_disjoint():
  corpus._generate.cache_clear()
  start = time.perf_counter()
  train = default_corpus('train')
  assert time.perf_counter() - start < 4.0  # ~1 s; generous for a loaded 2-core machine
  val = default_corpus('validation')
  corpus._generate.cache_clear()
  assert default_corpus('train') == train and default_corpus('validation') == val
  assert 2e6 < sum(map(len, train)) < 6e6 and 50e3 < sum(map(len, val)) < 200e3
  assert not set(train) & set(val)
  assert len(set(train)) > 0.7 * len(train)  # mostly distinct (short Q&A and sums recur)
  with pytest.raises(DataError, match="no split 'test'"):
    default_corpus('test')


def test_every_kind_of_document_occurs():
  train = default_corpus('train')
  kinds = collections.Counter(
      'story' if d.startswith('Once upon a time') else 'qa' if d.startswith('Q: ')
      else 'sums' if d[0].isdigit() else 'problem' if ' had ' in d.split('.')[0] else 'facts'
      for d in train)
  assert set(kinds) == {'story', 'qa', 'sums', 'problem', 'facts'}
  assert all(n > 0.04 * len(train) for n in kinds.values()), kinds


# Every sentence pattern that states a fact, as regexes over the generated text.
FACTS = {
    'home': [r'(\w+) lives in (\w+)\.', r'(\w+) the \w+ lived in (\w+)\.',
             r'named (\w+)\. \1 lived in (\w+)\.'],
    'animal': [r'(\w+) is an? (\w+)\.', r'(\w+) the (\w+) lived in', r'an? (?:\w+ )?(\w+) named (\w+)'],
    'food': [r'(\w+) likes (\w+)\.', r'(\w+) ate (\w+)\.', r'(\w+) brought (\w+)\.'],
    'friend': [r'The best friend of (\w+) is (\w+)\.', r'to (\w+), the best friend of (\w+)\.'],
    'country': [r'(\w+) is in (\w+)\.'],
    'capital': [r'The capital of (\w+) is (\w+)\.'],
}
SWAPPED = {r'an? (?:\w+ )?(\w+) named (\w+)', r'to (\w+), the best friend of (\w+)\.'}


def test_facts_never_contradict_across_documents_and_splits():
  seen = collections.defaultdict(set)
  for doc in default_corpus('train') + default_corpus('validation'):
    for kind, patterns in FACTS.items():
      for p in patterns:
        for m in re.finditer(p, doc):
          subject, value = m.groups()[::-1] if p in SWAPPED else m.groups()
          seen[kind, subject].add(value)
  conflicts = {k: v for k, v in seen.items() if len(v) > 1}
  assert not conflicts
  assert {kind for kind, _ in seen} == set(FACTS)  # every pattern found something to check
  names = {s for kind, s in seen if kind == 'home'}
  assert len(names) == len(corpus.NAMES) and len({k for k in seen if k[0] == 'capital'}) == 8


def test_arithmetic_is_correct():
  n = 0
  for doc in default_corpus('train')[:5000]:
    for a, op, b, c in re.findall(r'(\d+) ([-+*]) (\d+) = (\d+)', doc):
      assert eval(f'{a} {op} {b}') == int(c), doc
      n += 1
    for a, b, total in re.findall(r'had (\d+) \w+\. \w+ gave \w+ (\d+) more \w+\. Now \w+ has (\d+)',
                                  doc):
      assert int(a) + int(b) == int(total)
  assert n > 3000
