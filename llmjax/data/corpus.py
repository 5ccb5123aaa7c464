"""The embedded default corpus: stories, facts, questions and arithmetic about a fixed small world.

Generated, never downloaded, so the quickstart and the tests run offline. The world (which
animal each character is, where it lives, what it eats, who its best friend is; which city lies
in which country) is fixed by one seed and every document states it consistently, so a small
model can learn real facts, not just word statistics: after a few hundred steps "Mia the" is
followed by Mia's animal and "The capital of Peru is" by "Lima". The templates are few enough
to learn in minutes and varied enough that samples are recognisably from the corpus without
being copies of one document.

    default_corpus('train')       # 20,000 documents, ~3 MB, generated in about a second
    default_corpus('validation')  # ~650 documents, ~95 KB, none of them in 'train'
"""

import functools
import random

from llmjax.errors import DataError

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

# The world is fixed by its own seed, independent of the split seeds, so both splits (and every
# run) describe the same characters.
WORLD_SEED = 1234


def _world() -> dict:
  """Each character's fixed facts: the same in every document of both splits."""
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


def _found_story(rng: random.Random) -> str:
  name = rng.choice(NAMES)
  p = PEOPLE[name]
  friend = p['friend']
  obj, place = rng.choice(OBJECTS), rng.choice(PLACES)
  return (f"Once upon a time, there was a {rng.choice(ADJECTIVES)} {p['animal']} named {name}."
          f" {name} lived in {p['city']}. Every morning, {name} ate {p['food']}."
          f" One day, {name} found a {p['colour']} {obj} near the {place}."
          f" \"{rng.choice(SAYINGS)}!\" said {name}. Then {name} showed the {obj} to {friend},"
          f" the best friend of {name}. The end.")


def _visit_story(rng: random.Random) -> str:
  name = rng.choice(NAMES)
  p = PEOPLE[name]
  friend = p['friend']
  q = PEOPLE[friend]
  return (f"Once upon a time, {name} the {p['animal']} lived in {p['city']}."
          f" One {rng.choice(('sunny', 'rainy', 'windy', 'snowy'))} day, {name} went to visit"
          f" {friend} the {q['animal']} in {q['city']}. {q['city']} is in {q['country']}."
          f" {friend} made {q['food']} for {name}, and {name} brought {p['food']}."
          f" They walked to the {rng.choice(PLACES)} together. The end.")


def _facts(rng: random.Random) -> str:
  name = rng.choice(NAMES)
  p = PEOPLE[name]
  capital = COUNTRIES[p['country']][0]
  facts = [f"{name} is a {p['animal']}.", f"{name} lives in {p['city']}.",
           f"{name} likes {p['food']}.", f"The favourite colour of {name} is {p['colour']}.",
           f"{p['city']} is in {p['country']}.", f"The capital of {p['country']} is {capital}.",
           f"The best friend of {name} is {p['friend']}."]
  rng.shuffle(facts)
  return ' '.join(facts[:rng.randint(3, len(facts))])


def _questions(rng: random.Random) -> str:
  """Question/answer lines about one character and one country (answers are the facts)."""
  name = rng.choice(NAMES)
  p = PEOPLE[name]
  country = rng.choice(list(COUNTRIES))
  qa = [(f"What animal is {name}?", f"{name} is a {p['animal']}."),
        (f"Where does {name} live?", f"{name} lives in {p['city']}."),
        (f"What does {name} like to eat?", f"{name} likes {p['food']}."),
        (f"Who is the best friend of {name}?", f"The best friend of {name} is {p['friend']}."),
        (f"What is the capital of {country}?",
         f"The capital of {country} is {COUNTRIES[country][0]}.")]
  rng.shuffle(qa)
  return '\n'.join(f"Q: {q}\nA: {a}" for q, a in qa[:rng.randint(2, 4)])


def _arithmetic(rng: random.Random) -> str:
  lines = []
  for _ in range(rng.randint(3, 6)):
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    op = rng.choice('+-*')
    if op == '-' and b > a:
      a, b = b, a  # no negative numbers: the model learns sums, not signs
    value = {'+': a + b, '-': a - b, '*': a * b}[op]
    lines.append(f"{a} {op} {b} = {value}.")
  return ' '.join(lines)


def _word_problem(rng: random.Random) -> str:
  name = rng.choice(NAMES)
  p = PEOPLE[name]
  a, b = rng.randint(1, 9), rng.randint(1, 9)
  return (f"{name} had {a} {p['food']}. {p['friend']} gave {name} {b} more {p['food']}."
          f" Now {name} has {a + b} {p['food']}, because {a} + {b} = {a + b}.")


# (generator, weight): stories about 40% of documents, the rest short facts and sums.
GENERATORS = ((_found_story, 2), (_visit_story, 2), (_facts, 2), (_questions, 1.5),
              (_arithmetic, 1.5), (_word_problem, 1))
SPLITS = {'train': (0, 20_000), 'validation': (1, 1000)}  # split: (seed, documents generated)


@functools.cache
def _generate(split: str) -> tuple[str, ...]:
  seed, n = SPLITS[split]
  rng = random.Random(seed)
  generators, weights = zip(*GENERATORS)
  docs = [rng.choices(generators, weights)[0](rng) for _ in range(n)]
  if split != 'train':
    # Short fact lists recur; dropping those in 'train' makes eval measure generalisation to
    # new combinations, not recall of seen documents.
    train = set(_generate('train'))
    docs = [d for d in docs if d not in train]
  return tuple(docs)


def default_corpus(split: str) -> list[str]:
  """The generated documents of `split` ('train' or 'validation'); deterministic, disjoint."""
  if split not in SPLITS:
    raise DataError(f"the embedded corpus has no split '{split}'; use one of {list(SPLITS)}.")
  return list(_generate(split))
