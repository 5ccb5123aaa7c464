"""The embedded default corpus: short stories, facts and arithmetic about a fixed small world.

Generated, never downloaded, so the quickstart and the tests run offline. The world (who lives
where, keeps which pet, likes which food; which city lies in which country) is fixed by one
seed and every document states it consistently, so a small model can learn real facts, not
just word statistics; the templates are few enough to learn in minutes and varied enough that
samples are recognisably from the corpus without being copies of one document.
"""

import random

NAMES = ('Mia', 'Leo', 'Ava', 'Noah', 'Zoe', 'Omar', 'Lena', 'Ivan', 'Sara', 'Theo', 'Nina',
         'Hugo', 'Emma', 'Kai', 'Lucy', 'Ravi', 'Yuki', 'Ben', 'Anna', 'Tom', 'Rosa', 'Sam',
         'Iris', 'Finn')
ANIMALS = ('fox', 'cat', 'dog', 'owl', 'rabbit', 'bear', 'duck', 'horse', 'mouse', 'frog')
FOODS = ('apples', 'bread', 'soup', 'cheese', 'rice', 'carrots', 'honey', 'pancakes', 'fish',
         'cherries')
COLOURS = ('red', 'blue', 'green', 'yellow', 'purple', 'orange', 'white', 'black')
OBJECTS = ('key', 'map', 'hat', 'book', 'lamp', 'ball', 'box', 'coin', 'kite', 'shell')
PLACES = ('river', 'forest', 'market', 'bridge', 'garden', 'hill', 'lake', 'library')
ADJECTIVES = ('brave', 'small', 'clever', 'kind', 'quiet', 'curious', 'happy', 'sleepy')
COUNTRIES = {  # country: (capital, other cities)
    'France': ('Paris', ('Lyon', 'Nice')),
    'Japan': ('Tokyo', ('Osaka', 'Kyoto')),
    'Italy': ('Rome', ('Milan', 'Naples')),
    'Spain': ('Madrid', ('Seville', 'Valencia')),
    'Egypt': ('Cairo', ('Luxor', 'Giza')),
    'Canada': ('Ottawa', ('Toronto', 'Calgary')),
    'Peru': ('Lima', ('Cusco', 'Arequipa')),
    'Kenya': ('Nairobi', ('Mombasa', 'Nakuru')),
}
SAYINGS = ('What a lovely day', 'I will help you', 'Let us go together', 'Look at this',
           'I am not afraid', 'This is a surprise')

WORLD_SEED = 1234


def _world():
  """Each person's fixed facts: the same in every document and both splits."""
  rng = random.Random(WORLD_SEED)
  cities = [(c, country) for country, (cap, others) in COUNTRIES.items() for c in (cap,) + others]
  people = {}
  for name in NAMES:
    city, country = rng.choice(cities)
    people[name] = dict(animal=rng.choice(ANIMALS), food=rng.choice(FOODS),
                        colour=rng.choice(COLOURS), city=city, country=country,
                        friend=rng.choice([n for n in NAMES if n != name]))
  return people


PEOPLE = _world()


def _story(rng: random.Random) -> str:
  name = rng.choice(NAMES)
  p = PEOPLE[name]
  friend = p['friend']
  obj, place = rng.choice(OBJECTS), rng.choice(PLACES)
  return (f"Once upon a time, there was a {rng.choice(ADJECTIVES)} {p['animal']} named {name}."
          f" {name} lived in {p['city']} with {friend}. Every morning, {name} ate {p['food']}."
          f" One day, {name} found a {p['colour']} {obj} near the {place}."
          f" \"{rng.choice(SAYINGS)}!\" said {name}. Then {name} and {friend} took the {obj}"
          f" home. The end.")


def _facts(rng: random.Random) -> str:
  name = rng.choice(NAMES)
  p = PEOPLE[name]
  capital = COUNTRIES[p['country']][0]
  facts = [f"{name} lives in {p['city']}.", f"{name} has a pet {p['animal']}.",
           f"{name} likes {p['food']}.", f"The favourite colour of {name} is {p['colour']}.",
           f"{p['city']} is in {p['country']}.", f"The capital of {p['country']} is {capital}.",
           f"The best friend of {name} is {p['friend']}."]
  rng.shuffle(facts)
  return ' '.join(facts[:rng.randint(3, len(facts))])


def _arithmetic(rng: random.Random) -> str:
  lines = []
  for _ in range(rng.randint(3, 6)):
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    op = rng.choice('+-*')
    if op == '-' and b > a:
      a, b = b, a
    value = {'+': a + b, '-': a - b, '*': a * b}[op]
    lines.append(f"{a} {op} {b} = {value}.")
  return ' '.join(lines)


GENERATORS = (_story, _facts, _arithmetic)
SPLITS = {'train': (0, 20_000), 'validation': (1, 600)}  # (seed, documents)


def default_corpus(split: str) -> list[str]:
  """The generated documents of `split` ('train' or 'validation'), deterministic.

  The validation split holds only documents that do not occur in the train split, so its
  loss measures generalisation to new combinations, not recall of seen documents.
  """
  if split not in SPLITS:
    from llmjax.errors import DataError
    raise DataError(f"embedded corpus has no split '{split}'; use one of {list(SPLITS)}.")
  seed, n = SPLITS[split]
  rng = random.Random(seed)
  docs = [rng.choice(GENERATORS)(rng) for _ in range(n)]
  if split != 'train':
    train = set(default_corpus('train'))
    docs = [d for d in docs if d not in train]
  return docs
