"""The embedded task suite: GAIA-format tasks, generated deterministically from a seed, that can
only be solved by running code: questions over generated CSV/XLSX/JSON/text attachments,
multi-hop questions over a corpus of fictional entities reachable only through `search`, and
computations. Every task carries a reference solution (one code string per agent turn) that the
sandbox runs to the stored answer; the cold-start SFT data are these solutions.

Splits share no entities: every generated word belongs to exactly one split (by a hash of the
seed and the word), so one corpus, `corpus(seed)`, serves every split's search tool.
"""

from __future__ import annotations

import calendar
import csv
import dataclasses
import datetime
import html
import io
import json
import math
import random
import re
import zipfile
import zlib
from collections.abc import Callable, Sequence

import tensorflow_datasets as tfds

from toolr1_jax.data import records, types

SPLITS = ("train", "validation", "test")

# Modules the reference solutions use, for the sandbox's pre-warmed parent to import once rather
# than every session (pandas reads XLSX through openpyxl, whose zip reader loads the cp437 codec).
# Pass as `SandboxPool(..., preload=SANDBOX_PRELOAD)`.
SANDBOX_PRELOAD = ("numpy", "pandas", "openpyxl", "encodings.cp437")

# Entities in the corpus per split. Validation and test are smaller, like GAIA's.
_NUM_COMPANIES = {"train": 300, "validation": 60, "test": 60}

# ----------------------------------------------------------------------------------------------
# Names. Words are built from syllables so that no task mentions a real entity the model could
# know from pretraining; a word's split is a hash of (seed, word), which makes the splits'
# vocabularies of entity names disjoint by construction.
# ----------------------------------------------------------------------------------------------

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s")
_ONSETS += ("sk", "st", "t", "tr", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "nd", "rn", "x", "th")


def _split_of(seed: int, word: str) -> str:
    bucket = zlib.crc32(f"{seed}:{word.lower()}".encode()) % 20
    return "train" if bucket < 16 else ("validation" if bucket < 18 else "test")


class _Words:
    """Draws fresh capitalised words that belong to one split."""

    def __init__(self, rng: random.Random, seed: int, split: str):
        self.rng, self.seed, self.split = rng, seed, split
        self.used: set[str] = set()

    def __call__(self) -> str:
        while True:
            syllables = self.rng.choice((2, 2, 3))
            word = "".join(
                self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)
                for _ in range(syllables)
            ).capitalize()
            if word not in self.used and _split_of(self.seed, word) == self.split:
                self.used.add(word)
                return word


# ----------------------------------------------------------------------------------------------
# The world behind the search corpus.
# ----------------------------------------------------------------------------------------------

_INDUSTRIES = {
    "kitchenware": ("Blender", "Kettle", "Toaster"),
    "robotics": ("Drone", "Rover", "Arm"),
    "textile": ("Jacket", "Scarf", "Boot"),
    "audio": ("Speaker", "Headset", "Radio"),
    "cycling": ("Bike", "Helmet", "Pump"),
}
_SUFFIXES = ("Labs", "Works", "Systems", "Group", "Industries")
_OCCUPATIONS = ("engineer", "chemist", "designer", "inventor", "physicist", "economist")


@dataclasses.dataclass(frozen=True)
class _City:
    name: str
    country: str
    population: int


@dataclasses.dataclass(frozen=True)
class _Person:
    name: str
    occupation: str
    born: int
    birthplace: str
    company: str


@dataclasses.dataclass(frozen=True)
class _Company:
    name: str
    industry: str
    founded: int
    founder: str
    city: str
    employees: int


@dataclasses.dataclass(frozen=True)
class _Product:
    name: str
    kind: str
    company: str
    launched: int
    price: int


@dataclasses.dataclass(frozen=True)
class _World:
    cities: tuple[_City, ...]
    people: dict[str, _Person]
    companies: tuple[_Company, ...]
    company_by_name: dict[str, _Company]
    products: tuple[_Product, ...]
    city_by_name: dict[str, _City]


def _world(seed: int, split: str) -> _World:
    rng = random.Random(f"toolr1-synthetic:{seed}:{split}:world")
    word = _Words(rng, seed, split)
    num_companies = _NUM_COMPANIES[split]
    countries = [word() for _ in range(num_companies // 30 + 3)]
    cities = tuple(
        _City(word(), rng.choice(countries), rng.randrange(20_000, 2_000_000))
        for _ in range(num_companies // 4 + 5)
    )
    people, companies, products = {}, [], []
    for _ in range(num_companies):
        industry = rng.choice(sorted(_INDUSTRIES))
        name = f"{word()} {rng.choice(_SUFFIXES)}"
        founded = rng.randrange(1950, 2016)
        founder = _Person(
            name=f"{word()} {word()}",
            occupation=rng.choice(_OCCUPATIONS),
            born=founded - rng.randrange(24, 61),
            birthplace=rng.choice(cities).name,
            company=name,
        )
        people[founder.name] = founder
        companies.append(
            _Company(
                name=name,
                industry=industry,
                founded=founded,
                founder=founder.name,
                city=rng.choice(cities).name,
                employees=rng.randrange(12, 9000),
            )
        )
        # At most two products per company, so a search for the company's name finds at most
        # four documents that mention it (itself, its founder, its products): the company's own
        # page is always among the default top five results.
        for _ in range(rng.choice((1, 2))):
            products.append(
                _Product(
                    name=f"{word()} {rng.choice(_INDUSTRIES[industry])}",
                    kind=f"{industry} product",
                    company=name,
                    launched=rng.randrange(founded + 1, 2025),
                    price=rng.randrange(15, 900),
                )
            )
    return _World(
        cities=cities,
        people=people,
        companies=tuple(companies),
        company_by_name={c.name: c for c in companies},
        products=tuple(products),
        city_by_name={c.name: c for c in cities},
    )


def corpus(seed: int) -> list[dict[str, str]]:
    """The search corpus of every split (entities of different splits are disjoint).

    Returns `{"doc_id", "title", "text"}` dicts, the input of `tools.search.make_search_tool`.
    """
    docs = []
    for split in SPLITS:
        world = _world(seed, split)
        for c in world.companies:
            docs.append(
                (
                    c.name,
                    f"{c.name} is a {c.industry} company. {c.name} was founded in {c.founded} "
                    f"by {c.founder}. Its headquarters are in {c.city}. "
                    f"It has {c.employees} employees.",
                )
            )
        for p in world.people.values():
            docs.append(
                (
                    p.name,
                    f"{p.name} is a {p.occupation} born in {p.born} in {p.birthplace}. "
                    f"{p.name} founded {p.company}.",
                )
            )
        for p in world.products:
            docs.append(
                (
                    p.name,
                    f"The {p.name} is a {p.kind} made by {p.company}. The {p.name} was launched "
                    f"in {p.launched} and costs {p.price} dollars.",
                )
            )
        for c in world.cities:
            docs.append(
                (c.name, f"{c.name} is a city in {c.country}. {c.name} has {c.population} people.")
            )
    return [
        {"doc_id": f"doc-{i:05d}", "title": title, "text": text}
        for i, (title, text) in enumerate(docs)
    ]


# ----------------------------------------------------------------------------------------------
# Attachments. Bytes are deterministic so the same seed gives byte-identical tasks.
# ----------------------------------------------------------------------------------------------


def _csv_bytes(header: Sequence[str], rows: Sequence[Sequence[object]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


_PACKAGE_RELS = "http://schemas.openxmlformats.org/package/2006/relationships"
_DOC_RELS = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
_SHEET_NS = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
_XML = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'


def _xlsx_bytes(header: Sequence[str], rows: Sequence[Sequence[object]]) -> bytes:
    """A minimal one-sheet workbook (inline strings, no styles) that pandas and openpyxl read.

    Written by hand: openpyxl's writer costs ~100x more per file (most of the suite's build
    time) and stamps the current time into the file.
    """
    if len(header) > 26:
        raise ValueError("at most 26 columns (A-Z)")
    sheet_rows = []
    for r, values in enumerate([header, *rows], start=1):
        cells = []
        for c, v in enumerate(values):
            ref = f"{chr(ord('A') + c)}{r}"
            if isinstance(v, str):
                cells.append(f'<c r="{ref}" t="inlineStr"><is><t>{html.escape(v)}</t></is></c>')
            else:
                cells.append(f'<c r="{ref}"><v>{v}</v></c>')
        sheet_rows.append(f'<row r="{r}">{"".join(cells)}</row>')
    sheet_type = "application/vnd.openxmlformats-officedocument.spreadsheetml"
    parts = {
        "[Content_Types].xml": (
            f'{_XML}<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
            '<Default Extension="rels" '
            'ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
            '<Default Extension="xml" ContentType="application/xml"/>'
            f'<Override PartName="/xl/workbook.xml" ContentType="{sheet_type}.sheet.main+xml"/>'
            '<Override PartName="/xl/worksheets/sheet1.xml" '
            f'ContentType="{sheet_type}.worksheet+xml"/></Types>'
        ),
        "_rels/.rels": (
            f'{_XML}<Relationships xmlns="{_PACKAGE_RELS}"><Relationship Id="rId1" '
            f'Type="{_DOC_RELS}/officeDocument" Target="xl/workbook.xml"/></Relationships>'
        ),
        "xl/workbook.xml": (
            f'{_XML}<workbook xmlns="{_SHEET_NS}" xmlns:r="{_DOC_RELS}"><sheets>'
            '<sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>'
        ),
        "xl/_rels/workbook.xml.rels": (
            f'{_XML}<Relationships xmlns="{_PACKAGE_RELS}"><Relationship Id="rId1" '
            f'Type="{_DOC_RELS}/worksheet" Target="worksheets/sheet1.xml"/></Relationships>'
        ),
        "xl/worksheets/sheet1.xml": (
            f'{_XML}<worksheet xmlns="{_SHEET_NS}"><sheetData>{"".join(sheet_rows)}'
            "</sheetData></worksheet>"
        ),
    }
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in parts.items():
            # A fixed timestamp keeps the bytes identical for the same seed.
            archive.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), text)
    return out.getvalue()


# ----------------------------------------------------------------------------------------------
# Task families. Each returns a _Draft; level 1 families are short templated questions with one
# or two code turns in one consistent style, levels 2-3 add steps (joins, dates, multi-hop
# search). In search families the final turn copies a value read from an earlier observation;
# `facts` lists those values so a test can check that the observations really contain them.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Draft:
    question: str
    answer: object
    solution: list[str]
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    entities: list[str] = dataclasses.field(default_factory=list)
    facts: list[str] = dataclasses.field(default_factory=list)


def _lit(value: object) -> str:
    """A Python literal for a value copied into code: 1987 or "Mara Quell"."""
    return json.dumps(value) if isinstance(value, str) else str(value)


def _search(name: str) -> str:
    return f"print(search({_lit(name)}))"


def _unique_best(totals: dict[str, float], best: Callable = max) -> str | None:
    """The key with the best value, or None on a tie (the answer would be ambiguous)."""
    value = best(totals.values())
    keys = [k for k, v in totals.items() if v == value]
    return keys[0] if len(keys) == 1 else None


def _arith(rng: random.Random, world: _World, words: _Words) -> _Draft:
    a, b, c = rng.randrange(12, 999), rng.randrange(12, 999), rng.randrange(2, 99)
    expr, answer = rng.choice(
        (
            (f"{a} * {b} + {c}", a * b + c),
            (f"{a} * {b} - {c}", a * b - c),
            (f"({a} + {b}) * {c}", (a + b) * c),
            (f"{a} * {c} - {b}", a * c - b),
        )
    )
    return _Draft(f"What is {expr}?", answer, [f"final_answer({expr})"])


_AGG_TABLES = (
    ("sales.csv", "store", "region", ("North", "South", "East", "West"), ("units", "revenue")),
    ("team.csv", "name", "team", ("Red", "Blue", "Green", "Gold"), ("age", "salary")),
    ("stock.csv", "item", "warehouse", ("A", "B", "C", "D"), ("qty", "price")),
)


def _table_agg(rng: random.Random, world: _World, words: _Words) -> _Draft:
    file, key, cat, cats, values = rng.choice(_AGG_TABLES)
    rows = [
        (words(), rng.choice(cats), rng.randrange(1, 60), rng.randrange(10, 999))
        for _ in range(rng.randrange(10, 21))
    ]
    target = rng.choice([r[1] for r in rows])
    col = rng.randrange(2)
    picked = [r[2 + col] for r in rows if r[1] == target]
    op = rng.choice(("sum", "count", "max", "min"))
    v = values[col]
    where = f'df[df["{cat}"] == "{target}"]'
    question, answer, expr = {
        "sum": (
            f"What is the total {v} in {file} for rows where {cat} is {target}?",
            sum(picked),
            f'{where}["{v}"].sum()',
        ),
        "count": (f"How many rows in {file} have {cat} {target}?", len(picked), f"len({where})"),
        "max": (
            f"What is the largest {v} in {file} among rows where {cat} is {target}?",
            max(picked),
            f'{where}["{v}"].max()',
        ),
        "min": (
            f"What is the smallest {v} in {file} among rows where {cat} is {target}?",
            min(picked),
            f'{where}["{v}"].min()',
        ),
    }[op]
    code = f'import pandas as pd\ndf = pd.read_csv("{file}")\nfinal_answer({expr})'
    files = {file: _csv_bytes((key, cat, *values), rows)}
    return _Draft(question, answer, [code], files, entities=[r[0] for r in rows])


def _search_fact(rng: random.Random, world: _World, words: _Words) -> _Draft:
    company = rng.choice(world.companies)
    kind = rng.choice(("founded", "city", "employees", "born", "price"))
    if kind == "born":
        person = world.people[company.founder]
        name, answer = person.name, person.born
        question = f"Search for {name}: in which year was this person born?"
    elif kind == "price":
        product = rng.choice([p for p in world.products if p.company == company.name])
        name, answer = product.name, product.price
        question = f"Search for the {name}: how many dollars does it cost?"
    else:
        name = company.name
        answer = {"founded": company.founded, "city": company.city, "employees": company.employees}[
            kind
        ]
        question = {
            "founded": f"Search for {name}: in which year was it founded?",
            "city": f"Search for {name}: in which city are its headquarters?",
            "employees": f"Search for {name}: how many employees does it have?",
        }[kind]
    return _Draft(
        question,
        answer,
        [_search(name), f"final_answer({_lit(answer)})"],
        entities=[name],
        facts=[str(answer)],
    )


_ANIMALS = ("fox", "owl", "wolf", "bear", "hare", "lynx", "crow", "deer", "seal", "moth", "wren")


def _text_count(rng: random.Random, world: _World, words: _Words) -> _Draft:
    target = rng.choice(_ANIMALS)
    tokens = [rng.choice(_ANIMALS) for _ in range(rng.randrange(40, 90))]
    lines = [" ".join(tokens[i : i + 8]) for i in range(0, len(tokens), 8)]
    code = f'words = open("notes.txt").read().split()\nfinal_answer(words.count("{target}"))'
    return _Draft(
        f"How many times does the word {target} appear in notes.txt?",
        tokens.count(target),
        [code],
        {"notes.txt": ("\n".join(lines) + "\n").encode()},
    )


def _primes_below(n: int) -> list[int]:
    sieve = bytearray([1]) * n
    sieve[:2] = b"\x00\x00"
    for p in range(2, int(n**0.5) + 1):
        if sieve[p]:
            sieve[p * p :: p] = bytearray(len(range(p * p, n, p)))
    return [i for i in range(n) if sieve[i]]


def _compute(rng: random.Random, world: _World, words: _Words) -> _Draft:
    kind = rng.choice(("primes", "divisible", "fibonacci", "digits", "collatz"))
    if kind == "primes":
        n = rng.randrange(100, 5000)
        code = (
            f"final_answer(sum(n for n in range(2, {n}) "
            "if all(n % d for d in range(2, int(n ** 0.5) + 1))))"
        )
        return _Draft(f"What is the sum of all primes below {n}?", sum(_primes_below(n)), [code])
    if kind == "divisible":
        n, a, b = rng.randrange(500, 20000), rng.randrange(3, 15), rng.randrange(3, 15)
        # Inclusion-exclusion, computed independently of the brute-force reference solution.
        lcm = a * b // math.gcd(a, b)
        answer = n // a + n // b - n // lcm
        code = f"final_answer(sum(1 for n in range(1, {n} + 1) if n % {a} == 0 or n % {b} == 0))"
        return _Draft(
            f"How many integers from 1 to {n} are divisible by {a} or {b}?", answer, [code]
        )
    if kind == "fibonacci":
        k, m = rng.randrange(30, 300), rng.randrange(100, 10000)
        fib = [0, 1]
        while len(fib) <= k:
            fib.append(fib[-1] + fib[-2])
        code = f"a, b = 1, 1\nfor _ in range({k} - 2):\n    a, b = b, a + b\nfinal_answer(b % {m})"
        return _Draft(
            f"What is F({k}) mod {m}, where F(1) = F(2) = 1 and F(n) = F(n-1) + F(n-2)?",
            fib[k] % m,
            [code],
        )
    if kind == "digits":
        a, b = rng.randrange(2, 50), rng.randrange(20, 200)
        code = f"final_answer(sum(int(c) for c in str({a} ** {b})))"
        return _Draft(
            f"What is the sum of the digits of {a} ** {b}?", sum(map(int, str(a**b))), [code]
        )
    n = rng.randrange(10, 100000)
    steps, x = 0, n
    while x != 1:
        x = x // 2 if x % 2 == 0 else 3 * x + 1
        steps += 1
    code = (
        f"n, steps = {n}, 0\nwhile n != 1:\n    n = n // 2 if n % 2 == 0 else 3 * n + 1\n"
        "    steps += 1\nfinal_answer(steps)"
    )
    return _Draft(
        f"How many steps does the Collatz sequence starting at {n} take to reach 1?", steps, [code]
    )


def _read_and_show(file: str) -> str:
    reader = "read_excel" if file.endswith(".xlsx") else "read_csv"
    return f'import pandas as pd\ndf = pd.{reader}("{file}")\nprint(df.head())'


def _table_groupby(rng: random.Random, world: _World, words: _Words) -> _Draft:
    while True:
        cities = [words() for _ in range(rng.randrange(3, 6))]
        rows = [
            (rng.choice(cities), rng.randrange(1, 13), rng.randrange(100, 5000))
            for _ in range(rng.randrange(12, 30))
        ]
        groups: dict[str, list[int]] = {}
        for city, _, revenue in rows:
            groups.setdefault(city, []).append(revenue)
        kind = rng.choice(("highest total", "lowest total", "highest average"))
        if kind == "highest average":
            answer = _unique_best({c: sum(v) / len(v) for c, v in groups.items()})
            expr = 'df.groupby("city")["revenue"].mean().idxmax()'
        elif kind == "highest total":
            answer = _unique_best({c: sum(v) for c, v in groups.items()})
            expr = 'df.groupby("city")["revenue"].sum().idxmax()'
        else:
            answer = _unique_best({c: sum(v) for c, v in groups.items()}, min)
            expr = 'df.groupby("city")["revenue"].sum().idxmin()'
        if answer is not None:
            break
    return _Draft(
        f"Which city has the {kind} revenue in sales.xlsx?",
        answer,
        [_read_and_show("sales.xlsx"), f"final_answer({expr})"],
        {"sales.xlsx": _xlsx_bytes(("city", "month", "revenue"), rows)},
        entities=sorted(groups),
    )


def _dates(rng: random.Random, count: int) -> list[datetime.date]:
    start = datetime.date(2021, 1, 1)
    return sorted(start + datetime.timedelta(days=rng.randrange(0, 3 * 365)) for _ in range(count))


def _table_dates(rng: random.Random, world: _World, words: _Words) -> _Draft:
    customers = [words() for _ in range(5)]
    dates = _dates(rng, rng.randrange(20, 40))
    rows = [
        (1000 + i, rng.choice(customers), d.isoformat(), rng.randrange(5, 500))
        for i, d in enumerate(dates)
    ]
    parse = 'df["date"] = pd.to_datetime(df["date"])\n'
    kind = rng.choice(("month", "weekend", "span"))
    if kind == "month":
        day = rng.choice(dates)
        month = calendar.month_name[day.month]
        question = f"How many orders in orders.csv were placed in {month} {day.year}?"
        answer = sum(1 for d in dates if (d.year, d.month) == (day.year, day.month))
        expr = f'len(df[(df["date"].dt.year == {day.year}) & (df["date"].dt.month == {day.month})])'
    elif kind == "weekend":
        question = "What is the total amount of the orders in orders.csv placed on a weekend?"
        answer = sum(r[3] for r, d in zip(rows, dates, strict=True) if d.weekday() >= 5)
        expr = 'df[df["date"].dt.dayofweek >= 5]["amount"].sum()'
    else:
        question = "How many days passed between the first and the last order in orders.csv?"
        answer = (dates[-1] - dates[0]).days
        expr = '(df["date"].max() - df["date"].min()).days'
    return _Draft(
        question,
        answer,
        [_read_and_show("orders.csv"), f"{parse}final_answer({expr})"],
        {"orders.csv": _csv_bytes(("order_id", "customer", "date", "amount"), rows)},
        entities=customers,
    )


def _json_filter(rng: random.Random, world: _World, words: _Words) -> _Draft:
    teams = [words() for _ in range(3)]
    members = [
        {"name": f"{words()} {words()}", "team": rng.choice(teams), "age": rng.randrange(19, 70)}
        for _ in range(rng.randrange(8, 16))
    ]
    team = rng.choice([m["team"] for m in members])
    in_team = [m for m in members if m["team"] == team]
    kind = rng.choice(("average", "oldest", "older"))
    show = 'import json\nmembers = json.load(open("members.json"))\nprint(members[:2])'
    if kind == "oldest" and _unique_best({m["name"]: m["age"] for m in in_team}) is None:
        kind = "average"
    if kind == "average":
        question = (
            f"What is the average age of the members of team {team} in members.json? "
            "Round to 1 decimal."
        )
        ages = [m["age"] for m in in_team]
        # Same float operations as the solution: the rounding of a tie is then identical.
        answer = round(sum(ages) / len(ages), 1)
        code = (
            f'ages = [m["age"] for m in members if m["team"] == "{team}"]\n'
            "final_answer(round(sum(ages) / len(ages), 1))"
        )
    elif kind == "oldest":
        question = f"Who is the oldest member of team {team} in members.json?"
        answer = _unique_best({m["name"]: m["age"] for m in in_team})
        code = (
            f'team = [m for m in members if m["team"] == "{team}"]\n'
            'final_answer(max(team, key=lambda m: m["age"])["name"])'
        )
    else:
        age = rng.randrange(25, 60)
        question = f"How many members of team {team} in members.json are older than {age}?"
        answer = sum(1 for m in in_team if m["age"] > age)
        code = (
            f'final_answer(sum(1 for m in members if m["team"] == "{team}" and m["age"] > {age}))'
        )
    files = {"members.json": json.dumps(members, indent=1).encode()}
    return _Draft(
        question, answer, [show, code], files, entities=teams + [m["name"] for m in members]
    )


def _search_two_hop(rng: random.Random, world: _World, words: _Words) -> _Draft:
    product = rng.choice(world.products)
    company = world.company_by_name[product.company]
    kind = rng.choice(("founder", "city", "born", "country"))
    if kind in ("founder", "city"):
        answer = company.founder if kind == "founder" else company.city
        question = {
            "founder": f"Who founded the company that makes the {product.name}?",
            "city": f"In which city are the headquarters of the maker of the {product.name}?",
        }[kind]
        hops, facts = [product.name, company.name], [company.name, answer]
    elif kind == "born":
        answer = world.people[company.founder].born
        question = f"In which year was the founder of {company.name} born?"
        hops, facts = [company.name, company.founder], [company.founder, str(answer)]
    else:
        answer = world.city_by_name[company.city].country
        question = f"In which country are the headquarters of {company.name}?"
        hops, facts = [company.name, company.city], [company.city, answer]
    return _Draft(
        question,
        answer,
        [_search(h) for h in hops] + [f"final_answer({_lit(answer)})"],
        entities=hops,
        facts=facts,
    )


def _table_join(rng: random.Random, world: _World, words: _Words) -> _Draft:
    cities = [words() for _ in range(3)]
    customers = [(100 + i, f"{words()} {words()}", rng.choice(cities)) for i in range(6)]
    dates = _dates(rng, rng.randrange(20, 40))
    orders = [
        (1000 + i, rng.choice(customers)[0], d.isoformat(), rng.randrange(5, 500))
        for i, d in enumerate(dates)
    ]
    by_id = {c[0]: c for c in customers}
    year = rng.choice(dates).year
    in_year = [o for o in orders if o[2].startswith(str(year))]
    join = (
        'df = orders.merge(customers, on="customer_id")\n'
        f'df = df[df["date"].str.startswith("{year}")]\n'
    )
    totals: dict[str, int] = {}
    for o in in_year:
        totals[by_id[o[1]][1]] = totals.get(by_id[o[1]][1], 0) + o[3]
    best = _unique_best(totals)
    if best is not None and rng.random() < 0.5:
        question = f"Using orders.csv and customers.xlsx: which customer spent the most in {year}?"
        answer, expr = best, 'df.groupby("name")["amount"].sum().idxmax()'
    else:
        city = by_id[rng.choice(in_year)[1]][2]
        question = (
            f"Using orders.csv and customers.xlsx: what is the total amount of the {year} "
            f"orders by customers from {city}?"
        )
        answer = sum(o[3] for o in in_year if by_id[o[1]][2] == city)
        expr = f'df[df["city"] == "{city}"]["amount"].sum()'
    show = (
        'import pandas as pd\norders = pd.read_csv("orders.csv")\n'
        'customers = pd.read_excel("customers.xlsx")\nprint(orders.head())\n'
        "print(customers.head())"
    )
    files = {
        "orders.csv": _csv_bytes(("order_id", "customer_id", "date", "amount"), orders),
        "customers.xlsx": _xlsx_bytes(("customer_id", "name", "city"), customers),
    }
    entities = cities + [c[1] for c in customers]
    return _Draft(question, answer, [show, f"{join}final_answer({expr})"], files, entities)


def _search_compute(rng: random.Random, world: _World, words: _Words) -> _Draft:
    if rng.random() < 0.5:
        company = rng.choice(world.companies)
        person = world.people[company.founder]
        question = f"How old was the founder of {company.name} in the year the company was founded?"
        hops, facts = [company.name, person.name], [person.name, str(company.founded)]
        facts.append(str(person.born))
        expr, answer = f"{company.founded} - {person.born}", company.founded - person.born
    else:
        product = rng.choice(world.products)
        company = world.company_by_name[product.company]
        question = f"How many years after its maker was founded was the {product.name} launched?"
        hops = [product.name, company.name]
        facts = [company.name, str(product.launched), str(company.founded)]
        expr, answer = f"{product.launched} - {company.founded}", product.launched - company.founded
    return _Draft(
        question,
        answer,
        [_search(h) for h in hops] + [f"final_answer({expr})"],
        entities=hops,
        facts=facts,
    )


def _file_search(rng: random.Random, world: _World, words: _Words) -> _Draft:
    companies = rng.sample(world.companies, 4)
    while True:
        rows = [
            (f"{words()} {words()}", rng.choice(companies).name, rng.randrange(30, 200) * 1000)
            for _ in range(rng.randrange(8, 16))
        ]
        if rng.random() < 0.5:
            salaries = [r[2] for r in rows]
            top = max(salaries)
            employer = rows[salaries.index(top)][1] if salaries.count(top) == 1 else None
            locate = 'df.loc[df["salary"].idxmax(), "company"]'
            target = "the employer of the highest-paid employee"
        else:
            employer = _unique_best(
                {c: sum(1 for r in rows if r[1] == c) for c in {r[1] for r in rows}}
            )
            locate = 'df["company"].value_counts().idxmax()'
            target = "the company with the most employees in the file"
        if employer is not None:
            break
    company = world.company_by_name[employer]
    intro = "staff.csv lists employees and their companies."
    if rng.random() < 0.5:
        answer, question = company.founded, f"{intro} In which year was {target} founded?"
    else:
        answer, question = company.founder, f"{intro} Who founded {target}?"
    first = f'import pandas as pd\ndf = pd.read_csv("staff.csv")\nprint({locate})'
    return _Draft(
        question,
        answer,
        [first, _search(employer), f"final_answer({_lit(answer)})"],
        {"staff.csv": _csv_bytes(("name", "company", "salary"), rows)},
        entities=[c.name for c in companies] + [r[0] for r in rows],
        facts=[employer, str(answer)],
    )


# (name, level, generator). Levels follow the number of steps and tools a solution needs.
FAMILIES: tuple[tuple[str, int, Callable[..., _Draft]], ...] = (
    ("arith", 1, _arith),
    ("table_agg", 1, _table_agg),
    ("search_fact", 1, _search_fact),
    ("text_count", 1, _text_count),
    ("compute", 2, _compute),
    ("table_groupby", 2, _table_groupby),
    ("table_dates", 2, _table_dates),
    ("json_filter", 2, _json_filter),
    ("search_two_hop", 2, _search_two_hop),
    ("table_join", 3, _table_join),
    ("search_compute", 3, _search_compute),
    ("file_search", 3, _file_search),
)
FAMILY_LEVELS = {name: level for name, level, _ in FAMILIES}

# One short thought per solution turn, for demonstrations in the agent's "Thought: ... <code>"
# format; {0}, {1} are the names the solution searches for, in order.
_THOUGHTS = {
    "arith": ("Compute it in Python.",),
    "table_agg": ("Filter the table with pandas.",),
    "search_fact": ("Search for {0}.", "The result gives the answer."),
    "text_count": ("Count the word in the file.",),
    "compute": ("Compute it with a short program.",),
    "table_groupby": ("Look at the table first.", "Group by city and compare."),
    "table_dates": ("Look at the table first.", "Parse the dates and compute."),
    "json_filter": ("Look at the records first.", "Filter the team's members."),
    "search_two_hop": ("Search for {0}.", "Now search for {1}.", "The result gives the answer."),
    "table_join": ("Look at both tables first.", "Join them and filter by year."),
    "search_compute": ("Search for {0}.", "Now search for {1}.", "Compute the difference."),
    "file_search": ("Find the company in the table.", "Search for {0}.", "The result gives it."),
}
_SEARCHED = re.compile(r'print\(search\("([^"]*)"\)\)')


def _answer_text(value: object) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)


def generate(
    split: str,
    num_tasks: int,
    seed: int,
    *,
    levels: Sequence[int] | None = None,
    families: Sequence[str] | None = None,
) -> list[types.Example]:
    """The first `num_tasks` tasks of a split; deterministic in (split, seed, filters).

    Families take turns, so every family appears once `num_tasks` reaches their count; `levels`
    or `families` restrict the mix (e.g. `levels=(1,)` for a tiny model's first curriculum).
    Metadata: "family"; "solution" (code per turn, the last calls `final_answer`); "thoughts"
    (one short sentence per turn); "facts" (values the solution copies from observations);
    "entities" (the fictional names the task mentions).
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}")
    if num_tasks < 0:
        raise ValueError(f"num_tasks must be >= 0, got {num_tasks}")
    chosen = [
        f
        for f in FAMILIES
        if (levels is None or f[1] in levels) and (families is None or f[0] in families)
    ]
    if families is not None and (unknown := set(families) - set(FAMILY_LEVELS)):
        raise ValueError(f"Unknown families {sorted(unknown)}; known: {sorted(FAMILY_LEVELS)}")
    if not chosen:
        raise ValueError(f"No family matches levels={levels} families={families}")
    world = _world(seed, split)
    examples = []
    for i in range(num_tasks):
        name, level, make = chosen[i % len(chosen)]
        # One RNG per task keyed by its identity: a task does not change when num_tasks does.
        rng = random.Random(f"toolr1-synthetic:{seed}:{split}:{name}:{i}")
        draft = make(rng, world, _Words(rng, seed, split))
        searched = [m for code in draft.solution for m in _SEARCHED.findall(code)]
        thoughts = [t.format(*searched) for t in _THOUGHTS[name]]
        assert len(thoughts) == len(draft.solution), name
        examples.append(
            types.Example(
                task_id=f"syn-{seed}-{split}-{i:06d}-{name}",
                question=draft.question,
                answer=_answer_text(draft.answer),
                level=level,
                files=draft.files,
                metadata={
                    "source": "synthetic",
                    "family": name,
                    "solution": draft.solution,
                    "thoughts": thoughts,
                    "facts": draft.facts,
                    "entities": sorted(set(draft.entities)),
                },
            )
        )
    return examples


# ----------------------------------------------------------------------------------------------
# TFDS builder: the suite needs no download, so it builds offline anywhere.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    seed: int = 0
    num_train: int = 4000
    num_validation: int = 400
    num_test: int = 400
    levels: tuple[int, ...] | None = None

    def __post_init__(self):
        # The parameters go into the description, which TFDS stores with the built data, so
        # that reusing a config name with other parameters is caught (pipeline.builder).
        levels = "all" if self.levels is None else ",".join(map(str, self.levels))
        params = (
            f"[seed={self.seed} train={self.num_train} validation={self.num_validation} "
            f"test={self.num_test} levels={levels}]"
        )
        self.description = f"{self.description} {params}" if self.description else params


class SyntheticTasks(records.Builder):
    """The embedded GAIA-format task suite. Pair it with `corpus(config.seed)` for `search`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Twelve families over files, search and computation; levels 1-3."}
    BUILDER_CONFIGS = [
        SyntheticConfig(name="default", description="All families."),
        SyntheticConfig(name="level1", levels=(1,), description="Level-1 families only."),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=records.features(),
        )

    def _split_generators(self, dl_manager):
        config = self.builder_config
        sizes = {
            "train": config.num_train,
            "validation": config.num_validation,
            "test": config.num_test,
        }
        return {s: self._generate_examples(s, n) for s, n in sizes.items()}

    def _generate_examples(self, split: str, num_tasks: int):
        config = self.builder_config
        for example in generate(split, num_tasks, config.seed, levels=config.levels):
            yield example.task_id, records.encode(example)
