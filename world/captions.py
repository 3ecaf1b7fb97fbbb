"""Alt-texts for scenes: exact, partial, junk and translated captions, and hard negatives.

Every caption is a pure function of (scene, random stream), so the world is reproducible. The
translations are built from per-language word tables with gender and number agreement, so that a
language identifier sees real German, French, Spanish, Italian, Portuguese or Dutch.
"""
from __future__ import annotations

import copy
import random
from typing import Any

from recap.world.scenes import COLOURS, SHAPES, Scene, dominant, groups

# -- English --------------------------------------------------------------------------------------

_EN_NUMBERS = {2: "two", 3: "three", 4: "four"}
_EN_SIZE = {"small": ("small", "little"), "medium": ("",), "large": ("large", "big")}
_EN_PLURAL = {"cross": "crosses"}

EXACT_TEMPLATES = (
    "{objs} on a {bg} background",
    "a photo of {objs} on a {bg} background",
    "{objs} against a {bg} backdrop",
    "an illustration of {objs}, {bg} background",
    "{objs} drawn on {bg}",
    "clip art: {objs} on a {bg} background",
    "a picture showing {objs} on a plain {bg} background",
    "a {bg} background with {objs}",
)


def _article(word: str) -> str:
    return "an" if word[:1] in "aeio" else "a"


def _en_plural(shape: str) -> str:
    return _EN_PLURAL.get(shape, shape + "s")


def _join(parts: list[str], and_word: str) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + f" {and_word} " + parts[-1]


def en_group(count: int, size: str, colour: str | None, shape: str | None, size_variant: int = 0) -> str:
    size_words = _EN_SIZE.get(size, ("",))
    words = [w for w in (size_words[size_variant % len(size_words)] if size else "", colour or "") if w]
    noun = (shape or "shape") if count == 1 else _en_plural(shape or "shape")
    head = " ".join([*words, noun])
    return f"{_article(head)} {head}" if count == 1 else f"{_EN_NUMBERS[count]} {head}"


def en_objects(scene: Scene, *, sizes: bool = True, colours: bool = True, shapes: bool = True,
               size_variant: int = 0) -> str:
    # Attributes left out merge groups: "a triangle and two crosses", not "a cross, a cross".
    merged: dict[tuple, int] = {}
    for n, size, colour, shape in groups(scene):
        key = (size if sizes else "", colour if colours else None, shape if shapes else None)
        merged[key] = merged.get(key, 0) + n
    parts = [en_group(min(n, 4), *key, size_variant) for key, n in merged.items()]
    return _join(parts, "and")


def exact_en(scene: Scene, template: int, size_variant: int = 0, style: int = 0) -> str:
    """An exact caption: every object, with count, size, colour and shape, and the background.
    ``style`` varies surface form only (capital letter, full stop)."""
    text = EXACT_TEMPLATES[template % len(EXACT_TEMPLATES)].format(
        objs=en_objects(scene, size_variant=size_variant), bg=scene["background"])
    return _style(text, style)


def _style(text: str, style: int) -> str:
    if style & 1:
        text = text[0].upper() + text[1:]
    if style & 2:
        text += "."
    return text


def random_exact(scene: Scene, rng: random.Random) -> str:
    return exact_en(scene, rng.randrange(len(EXACT_TEMPLATES)), rng.randrange(2), rng.randrange(4))


def partial_en(scene: Scene, rng: random.Random) -> str:
    """Mentions only some objects or attributes: true, but incomplete."""
    gs = groups(scene)
    bg = scene["background"]
    variants = ["shapes_only", "colours_only", "some_shapes"]
    if len(gs) > 1:
        variants += ["dominant_only", "dominant_only"]
    else:
        variants += ["no_colour"]
    kind = rng.choice(variants)
    if kind == "dominant_only":
        n, size, colour, shape = gs[0]
        text = en_group(n, size, colour, shape)
    elif kind == "no_colour":
        text = f"{en_objects(scene, colours=False)} on a {bg} background"
    elif kind == "shapes_only":
        text = en_objects(scene, sizes=False, colours=False)
    elif kind == "colours_only":
        cols = list(dict.fromkeys(c for _, _, c, _ in gs))
        text = f"{_join(cols, 'and')} shapes" + (f" on {bg}" if rng.random() < 0.5 else "")
    else:
        what = rng.choice(("some shapes", "abstract shapes", "geometric shapes", "simple shapes"))
        text = f"{what} on a {bg} background"
    return _style(text, rng.randrange(4))


# -- junk -----------------------------------------------------------------------------------------

_SPAM = ("best", "cheap", "buy now", "free shipping", "sale", "discount", "top quality", "wholesale", "hot deal",
         "limited offer", "order today", "lowest price", "official store", "new arrival", "50% off")


def junk(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """(caption, lang): file names, SEO spam, navigation text. File names have no language ('und')."""
    kind = rng.randrange(8)
    if kind == 0:
        return f"IMG_{rng.randrange(10000):04d}.{rng.choice(('JPG', 'jpg', 'jpeg', 'PNG'))}", "und"
    if kind == 1:
        return f"{rng.choice(('DSC', 'DSCN', 'DSC_', 'P'))}{rng.randrange(100000):05d}", "und"
    if kind == 2:
        return (f"photo_{rng.randrange(2010, 2025)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}_"
                f"{rng.randrange(24):02d}-{rng.randrange(60):02d}.jpg"), "und"
    if kind == 3:
        return "".join(rng.choice("0123456789abcdef") for _ in range(32)), "und"
    if kind == 4:
        return rng.choice(("image (3).png", "untitled-1", "thumbnail", "banner_728x90", "logo_small", "spacer.gif",
                           "placeholder", "stock-photo-1234567")), "und"
    if kind == 5:
        d = dominant(scene)
        words = rng.sample(_SPAM, 5)
        return f"{words[0]} {d['colour']} {d['shape']} {' '.join(words[1:])} !!!", "en"
    if kind == 6:
        return rng.choice(("click here", "Click here to enlarge", "read more", "image", "view full size",
                           "download now", "see details")), "en"
    return " ".join(rng.sample(_SPAM, rng.randint(4, 8))), "en"


def huge(scene: Scene, rng: random.Random, size: int = 1 << 20) -> str:
    """An exact caption drowned in keyword stuffing: about ``size`` characters."""
    head = random_exact(scene, rng) + " | "
    d = dominant(scene)
    block = " ".join([f"{d['colour']} {d['shape']}", *_SPAM]) + " "
    reps = (size - len(head)) // len(block) + 1
    return (head + block * reps)[:size]


# -- other languages ------------------------------------------------------------------------------

LANGS: dict[str, float] = {"de": 0.25, "fr": 0.25, "es": 0.2, "it": 0.1, "pt": 0.1, "nl": 0.1}

# shape -> (gender, singular, plural)
_NOUNS: dict[str, dict[str, tuple[str, str, str]]] = {
    "de": {"circle": ("m", "Kreis", "Kreise"), "square": ("n", "Quadrat", "Quadrate"),
           "triangle": ("n", "Dreieck", "Dreiecke"), "star": ("m", "Stern", "Sterne"),
           "hexagon": ("n", "Sechseck", "Sechsecke"), "heart": ("n", "Herz", "Herzen"),
           "cross": ("n", "Kreuz", "Kreuze"), "diamond": ("f", "Raute", "Rauten"),
           "crescent": ("m", "Halbmond", "Halbmonde"), "pentagon": ("n", "Fünfeck", "Fünfecke"),
           "ring": ("m", "Ring", "Ringe"), "arrow": ("m", "Pfeil", "Pfeile"),
           "octagon": ("n", "Achteck", "Achtecke"), "oval": ("n", "Oval", "Ovale")},
    "fr": {"circle": ("m", "cercle", "cercles"), "square": ("m", "carré", "carrés"),
           "triangle": ("m", "triangle", "triangles"), "star": ("f", "étoile", "étoiles"),
           "hexagon": ("m", "hexagone", "hexagones"), "heart": ("m", "cœur", "cœurs"),
           "cross": ("f", "croix", "croix"), "diamond": ("m", "losange", "losanges"),
           "crescent": ("m", "croissant", "croissants"), "pentagon": ("m", "pentagone", "pentagones"),
           "ring": ("m", "anneau", "anneaux"), "arrow": ("f", "flèche", "flèches"),
           "octagon": ("m", "octogone", "octogones"), "oval": ("m", "ovale", "ovales")},
    "es": {"circle": ("m", "círculo", "círculos"), "square": ("m", "cuadrado", "cuadrados"),
           "triangle": ("m", "triángulo", "triángulos"), "star": ("f", "estrella", "estrellas"),
           "hexagon": ("m", "hexágono", "hexágonos"), "heart": ("m", "corazón", "corazones"),
           "cross": ("f", "cruz", "cruces"), "diamond": ("m", "rombo", "rombos"),
           "crescent": ("f", "media luna", "medias lunas"), "pentagon": ("m", "pentágono", "pentágonos"),
           "ring": ("m", "anillo", "anillos"), "arrow": ("f", "flecha", "flechas"),
           "octagon": ("m", "octágono", "octágonos"), "oval": ("m", "óvalo", "óvalos")},
    "it": {"circle": ("m", "cerchio", "cerchi"), "square": ("m", "quadrato", "quadrati"),
           "triangle": ("m", "triangolo", "triangoli"), "star": ("f", "stella", "stelle"),
           "hexagon": ("m", "esagono", "esagoni"), "heart": ("m", "cuore", "cuori"),
           "cross": ("f", "croce", "croci"), "diamond": ("m", "rombo", "rombi"),
           "crescent": ("f", "mezzaluna", "mezzelune"), "pentagon": ("m", "pentagono", "pentagoni"),
           "ring": ("m", "anello", "anelli"), "arrow": ("f", "freccia", "frecce"),
           "octagon": ("m", "ottagono", "ottagoni"), "oval": ("m", "ovale", "ovali")},
    "pt": {"circle": ("m", "círculo", "círculos"), "square": ("m", "quadrado", "quadrados"),
           "triangle": ("m", "triângulo", "triângulos"), "star": ("f", "estrela", "estrelas"),
           "hexagon": ("m", "hexágono", "hexágonos"), "heart": ("m", "coração", "corações"),
           "cross": ("f", "cruz", "cruzes"), "diamond": ("m", "losango", "losangos"),
           "crescent": ("f", "meia-lua", "meias-luas"), "pentagon": ("m", "pentágono", "pentágonos"),
           "ring": ("m", "anel", "anéis"), "arrow": ("f", "seta", "setas"),
           "octagon": ("m", "octógono", "octógonos"), "oval": ("m", "oval", "ovais")},
    "nl": {"circle": ("de", "cirkel", "cirkels"), "square": ("het", "vierkant", "vierkanten"),
           "triangle": ("de", "driehoek", "driehoeken"), "star": ("de", "ster", "sterren"),
           "hexagon": ("de", "zeshoek", "zeshoeken"), "heart": ("het", "hart", "harten"),
           "cross": ("het", "kruis", "kruisen"), "diamond": ("de", "ruit", "ruiten"),
           "crescent": ("de", "halve maan", "halve manen"), "pentagon": ("de", "vijfhoek", "vijfhoeken"),
           "ring": ("de", "ring", "ringen"), "arrow": ("de", "pijl", "pijlen"),
           "octagon": ("de", "achthoek", "achthoeken"), "oval": ("het", "ovaal", "ovalen")},
}


def _forms(m: str, f: str | None = None, mpl: str | None = None, fpl: str | None = None) -> dict[str, str]:
    """Romance adjective forms; missing ones follow the regular -s plural / invariable feminine."""
    f = f if f is not None else m
    return {"m": m, "f": f, "mpl": mpl if mpl is not None else m + "s", "fpl": fpl if fpl is not None else f + "s"}


def _inv(w: str) -> dict[str, str]:
    return {"m": w, "f": w, "mpl": w, "fpl": w}


# German: adjective stems, declined by _de_adj. Dutch: (uninflected, inflected).
_DE_COLOURS = {"red": "rot", "blue": "blau", "green": "grün", "yellow": "gelb", "orange": "orangefarben",
               "purple": "violett", "pink": "rosafarben", "brown": "braun", "black": "schwarz", "white": "weiß",
               "gray": "grau", "turquoise": "türkisfarben", "beige": "beigefarben"}
_DE_SIZES = {"small": "klein", "large": "groß"}
_NL_COLOURS = {"red": ("rood", "rode"), "blue": ("blauw", "blauwe"), "green": ("groen", "groene"),
               "yellow": ("geel", "gele"), "orange": ("oranje", "oranje"), "purple": ("paars", "paarse"),
               "pink": ("roze", "roze"), "brown": ("bruin", "bruine"), "black": ("zwart", "zwarte"),
               "white": ("wit", "witte"), "gray": ("grijs", "grijze"), "turquoise": ("turquoise", "turquoise"),
               "beige": ("beige", "beige")}
_NL_SIZES = {"small": ("klein", "kleine"), "large": ("groot", "grote")}

_ROMANCE_COLOURS: dict[str, dict[str, dict[str, str]]] = {
    "fr": {"red": _forms("rouge"), "blue": _forms("bleu", "bleue"), "green": _forms("vert", "verte"),
           "yellow": _forms("jaune"), "orange": _inv("orange"), "purple": _forms("violet", "violette"),
           "pink": _forms("rose"), "brown": _inv("marron"), "black": _forms("noir", "noire"),
           "white": _forms("blanc", "blanche"), "gray": _forms("gris", "grise", "gris"),
           "turquoise": _inv("turquoise"), "beige": _forms("beige")},
    "es": {"red": _forms("rojo", "roja"), "blue": _forms("azul", "azul", "azules", "azules"),
           "green": _forms("verde"), "yellow": _forms("amarillo", "amarilla"), "orange": _inv("naranja"),
           "purple": _forms("morado", "morada"), "pink": _inv("rosa"),
           "brown": _forms("marrón", "marrón", "marrones", "marrones"), "black": _forms("negro", "negra"),
           "white": _forms("blanco", "blanca"), "gray": _forms("gris", "gris", "grises", "grises"),
           "turquoise": _inv("turquesa"), "beige": _inv("beige")},
    "it": {"red": _forms("rosso", "rossa", "rossi", "rosse"), "blue": _inv("blu"),
           "green": _forms("verde", "verde", "verdi", "verdi"),
           "yellow": _forms("giallo", "gialla", "gialli", "gialle"),
           "orange": _forms("arancione", "arancione", "arancioni", "arancioni"), "purple": _inv("viola"),
           "pink": _inv("rosa"), "brown": _forms("marrone", "marrone", "marroni", "marroni"),
           "black": _forms("nero", "nera", "neri", "nere"), "white": _forms("bianco", "bianca", "bianchi", "bianche"),
           "gray": _forms("grigio", "grigia", "grigi", "grigie"),
           "turquoise": _forms("turchese", "turchese", "turchesi", "turchesi"), "beige": _inv("beige")},
    "pt": {"red": _forms("vermelho", "vermelha"), "blue": _forms("azul", "azul", "azuis", "azuis"),
           "green": _forms("verde"), "yellow": _forms("amarelo", "amarela"), "orange": _inv("laranja"),
           "purple": _forms("roxo", "roxa"), "pink": _inv("rosa"),
           "brown": _forms("marrom", "marrom", "marrons", "marrons"),
           "black": _forms("preto", "preta"), "white": _forms("branco", "branca"), "gray": _inv("cinza"),
           "turquoise": _inv("turquesa"), "beige": _forms("bege")},
}
_ROMANCE_SIZES: dict[str, dict[str, dict[str, str]]] = {
    "fr": {"small": _forms("petit", "petite"), "large": _forms("grand", "grande")},
    "es": {"small": _forms("pequeño", "pequeña"), "large": _forms("grande", "grande", "grandes", "grandes")},
    "it": {"small": _forms("piccolo", "piccola", "piccoli", "piccole"),
           "large": _forms("grande", "grande", "grandi", "grandi")},
    "pt": {"small": _forms("pequeno", "pequena"), "large": _forms("grande")},
}
_ARTICLES = {"fr": ("un", "une"), "es": ("un", "una"), "it": ("un", "una"), "pt": ("um", "uma")}
_NUMBERS = {"de": {2: "zwei", 3: "drei", 4: "vier"}, "fr": {2: "deux", 3: "trois", 4: "quatre"},
            "es": {2: "dos", 3: "tres", 4: "cuatro"}, "it": {2: "due", 3: "tre", 4: "quattro"},
            "pt": {2: "dois", 3: "três", 4: "quatro"}, "nl": {2: "twee", 3: "drie", 4: "vier"}}
_AND = {"de": "und", "fr": "et", "es": "y", "it": "e", "pt": "e", "nl": "en"}
# Where the size adjective goes relative to the noun (colour follows the noun in Romance languages).
_SIZE_BEFORE_NOUN = {"fr": True, "es": False, "it": True, "pt": True}

FOREIGN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "de": ("{objs} auf {bg}em Hintergrund", "Foto: {objs} auf {bg}em Hintergrund", "{objs} vor {bg}em Hintergrund"),
    "fr": ("{objs} sur fond {bg}", "photo : {objs} sur fond {bg}", "{objs} sur un fond {bg}"),
    "es": ("{objs} sobre fondo {bg}", "foto: {objs} sobre un fondo {bg}", "{objs} con fondo {bg}"),
    "it": ("{objs} su sfondo {bg}", "foto: {objs} su uno sfondo {bg}", "{objs} con sfondo {bg}"),
    "pt": ("{objs} sobre fundo {bg}", "foto: {objs} sobre um fundo {bg}", "{objs} com fundo {bg}"),
    "nl": ("{objs} op een {bg} achtergrond", "foto: {objs} tegen een {bg} achtergrond"),
}


def _de_group(n: int, size: str, colour: str, shape: str) -> str:
    gender, sing, plural = _NOUNS["de"][shape]
    stems = [w for w in (_DE_SIZES.get(size), _DE_COLOURS[colour]) if w]
    if n == 1:
        # Strong endings after the indefinite article (nominative).
        ending = {"m": "er", "n": "es", "f": "e"}[gender]
        return " ".join(["eine" if gender == "f" else "ein", *(s + ending for s in stems), sing])
    return " ".join([_NUMBERS["de"][n], *(s + "e" for s in stems), plural])


def _nl_group(n: int, size: str, colour: str, shape: str) -> str:
    gender, sing, plural = _NOUNS["nl"][shape]
    adjs = [w for w in (_NL_SIZES.get(size), _NL_COLOURS[colour]) if w]
    if n == 1:
        # "een rood vierkant" (het-word) but "een rode cirkel" (de-word).
        return " ".join(["een", *(a[0] if gender == "het" else a[1] for a in adjs), sing])
    return " ".join([_NUMBERS["nl"][n], *(a[1] for a in adjs), plural])


def _romance_group(lang: str, n: int, size: str, colour: str, shape: str) -> str:
    gender, sing, plural = _NOUNS[lang][shape]
    form = gender + ("" if n == 1 else "pl")
    size_word = _ROMANCE_SIZES[lang][size][form] if size in _ROMANCE_SIZES[lang] else None
    colour_word = _ROMANCE_COLOURS[lang][colour][form]
    if n == 1:
        head = _ARTICLES[lang][gender == "f"]
    elif lang == "pt" and n == 2 and gender == "f":
        head = "duas"
    else:
        head = _NUMBERS[lang][n]
    words = [head]
    if size_word and _SIZE_BEFORE_NOUN[lang]:
        words.append(size_word)
    words += [sing if n == 1 else plural, colour_word]
    if size_word and not _SIZE_BEFORE_NOUN[lang]:
        words.append(size_word)
    return " ".join(words)


def foreign(scene: Scene, lang: str, template: int) -> str:
    """The exact caption in another language: every object, count, size, colour and background."""
    parts = []
    for n, size, colour, shape in groups(scene):
        if lang == "de":
            parts.append(_de_group(n, size, colour, shape))
        elif lang == "nl":
            parts.append(_nl_group(n, size, colour, shape))
        else:
            parts.append(_romance_group(lang, n, size, colour, shape))
    bg = scene["background"]
    if lang == "de":
        bg_word = _DE_COLOURS[bg]
    elif lang == "nl":
        bg_word = _NL_COLOURS[bg][1]
    else:
        bg_word = _ROMANCE_COLOURS[lang][bg]["m"]
    templates = FOREIGN_TEMPLATES[lang]
    text = templates[template % len(templates)].format(objs=_join(parts, _AND[lang]), bg=bg_word)
    return text[0].upper() + text[1:]


def random_foreign(scene: Scene, rng: random.Random) -> tuple[str, str]:
    lang = rng.choices(list(LANGS), weights=list(LANGS.values()))[0]
    return foreign(scene, lang, rng.randrange(len(FOREIGN_TEMPLATES[lang]))), lang


# -- hard negatives -------------------------------------------------------------------------------

def hard_negative(scene: Scene, rng: random.Random) -> tuple[Scene, str]:
    """A scene that differs from ``scene`` in one compositional detail (SugarCrepe-style):
    colours swapped between two objects, or the dominant object's colour or shape replaced.
    Its caption, rendered with the positive's template, is the negative caption."""
    neg = copy.deepcopy(scene)
    objs = neg["objects"]
    used = {o["colour"] for o in objs} | {neg["background"]}
    swappable = [i for i, o in enumerate(objs) if o["colour"] != objs[0]["colour"]]
    kinds = ["replace_colour", "replace_shape"] + (["swap_colour", "swap_colour"] if swappable else [])
    kind = rng.choice(kinds)
    if kind == "swap_colour":
        j = rng.choice(swappable)
        a, b = objs[0]["colour"], objs[j]["colour"]
        for o in objs:  # swap every object of each colour, so groups stay consistent
            o["colour"] = b if o["colour"] == a else a if o["colour"] == b else o["colour"]
    elif kind == "replace_colour":
        old = objs[0]["colour"]
        new = rng.choice([c for c in COLOURS if c not in used])
        for o in objs:
            if o["colour"] == old and o["shape"] == objs[0]["shape"]:
                o["colour"] = new
    else:
        old = objs[0]["shape"]
        new = rng.choice([s for s in SHAPES if s not in {o["shape"] for o in objs}])
        for o in objs:
            if o["shape"] == old and o["colour"] == objs[0]["colour"]:
                o["shape"] = new
    return neg, kind


def caption_parts(scene: Scene) -> dict[str, Any]:
    """What an exact caption must mention, for tests and evaluation."""
    return {"background": scene["background"],
            "groups": [{"count": n, "size": s, "colour": c, "shape": sh} for n, s, c, sh in groups(scene)]}
