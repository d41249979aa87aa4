"""Write data/examples/leaflets.json: 16 made-up remedies, each a question listing symptoms and a long
leaflet-style answer (640-710 tokens with the bundled model) that names the product in its first
sentence. No model has seen these products, so "does the tuned model name the right one?" is a clean test
of whether a run learned long answers. Deterministic: `python scripts/make_leaflets.py` rewrites the
same file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "examples" / "leaflets.json"

# (product, form, symptoms asked about, what it treats, main ingredients)
PRODUCTS = [
    (
        "Corvatine Syrup",
        "syrup",
        "Dry cough, sore throat, hoarse voice.",
        "dry cough and throat irritation",
        ["loquat leaf extract", "honeysuckle flower", "licorice root", "balloon flower root"],
    ),
    (
        "Mellorin Tablets",
        "tablet",
        "Tension headache, stiff neck, poor sleep.",
        "tension headache with neck stiffness",
        ["kudzu root", "white peony root", "chuanxiong rhizome", "gastrodia tuber"],
    ),
    (
        "Quessadol Granules",
        "granule",
        "Bloating after meals, belching, loss of appetite.",
        "indigestion and bloating",
        ["hawthorn fruit", "malted barley", "tangerine peel", "atractylodes rhizome"],
    ),
    (
        "Thessaline Ointment",
        "ointment",
        "Itchy red patches on the skin, flaking.",
        "itchy eczema-like rashes",
        ["sophora root", "phellodendron bark", "zinc oxide", "borneol"],
    ),
    (
        "Ravenquil Capsules",
        "capsule",
        "Joint pain in the knees, worse in cold and damp weather.",
        "joint pain made worse by cold and damp",
        ["eucommia bark", "notopterygium root", "angelica root", "cinnamon twig"],
    ),
    (
        "Ostrelle Drops",
        "eye drop",
        "Dry, tired, gritty eyes after screen work.",
        "dry and tired eyes",
        ["chrysanthemum flower extract", "sodium hyaluronate", "borneol", "wolfberry extract"],
    ),
    (
        "Pellumax Oral Liquid",
        "oral liquid",
        "Fatigue, shortness of breath on effort, pale face.",
        "fatigue with shortness of breath",
        ["astragalus root", "codonopsis root", "jujube fruit", "white atractylodes"],
    ),
    (
        "Sirvane Lozenges",
        "lozenge",
        "Painful mouth ulcers, bad breath.",
        "mouth ulcers and bad breath",
        ["coptis rhizome", "mint oil", "borneol", "indigo leaf"],
    ),
    (
        "Draventol Suppositories",
        "suppository",
        "Anal pain, haemorrhoids, small tears that bleed.",
        "haemorrhoids and anal fissures",
        ["sanguisorba root", "sophora flower", "musk ketone", "calamine"],
    ),
    (
        "Lunavex Tea",
        "herbal tea",
        "Trouble falling asleep, waking at night, racing thoughts.",
        "difficulty sleeping",
        ["jujube seed", "poria", "lily bulb", "albizia bark"],
    ),
    (
        "Brennacort Spray",
        "nasal spray",
        "Blocked nose, sneezing, runny nose in spring.",
        "seasonal nasal allergy",
        ["magnolia flower", "xanthium fruit", "angelica dahurica root", "saline"],
    ),
    (
        "Feldrune Plasters",
        "plaster",
        "Lower back pain after lifting, muscle stiffness.",
        "lower back strain",
        ["safflower", "frankincense", "myrrh", "camphor"],
    ),
    (
        "Gaultrex Powder",
        "powder",
        "Loose stools, cramping, after eating cold food.",
        "diarrhoea after cold food",
        ["dried ginger", "ginseng root", "white atractylodes", "roasted licorice"],
    ),
    (
        "Hollimet Pills",
        "pill",
        "Hot flushes, night sweats, irritability around menopause.",
        "menopausal hot flushes",
        ["rehmannia root", "anemarrhena rhizome", "cornus fruit", "moutan bark"],
    ),
    (
        "Istrova Mouthwash",
        "mouthwash",
        "Swollen, bleeding gums when brushing.",
        "swollen and bleeding gums",
        ["cinnamon bark oil", "clove oil", "scutellaria root", "sodium fluoride"],
    ),
    (
        "Jorvelle Cream",
        "cream",
        "Cracked, dry heels and hands in winter.",
        "cracked and dry skin",
        ["urea", "shea butter", "comfrey root", "glycerin"],
    ),
]

PRECAUTIONS = [
    "Avoid tobacco, alcohol and spicy, greasy or raw cold food while using this product.",
    "Do not take other medicines for the same complaint at the same time without asking a doctor.",
    "People with high blood pressure, heart disease, liver disease, diabetes or kidney disease should use it "
    "under a doctor's guidance.",
    "Children, pregnant or breastfeeding women, the elderly and the frail should use it under a doctor's "
    "guidance.",
    "If the symptoms do not improve within three days of use, or new symptoms appear, see a doctor.",
    "Strictly follow the dosage; long-term continuous use is not recommended.",
    "People allergic to this product must not use it; people with an allergic constitution should use it "
    "with "
    "caution.",
    "Do not use the product if its appearance or smell has changed.",
    "Children must use it under the supervision of an adult.",
    "Keep this product out of the reach of children.",
    "If you are taking other medicines, please consult a doctor or pharmacist before use.",
    "Stop using it at once and seek medical advice if a rash, swelling or breathing difficulty appears.",
    "Do not drive or operate machinery if you feel drowsy after using it.",
    "Rest well, drink enough water and keep a light diet during treatment.",
]

REACTIONS = [
    "mild nausea",
    "a slight headache",
    "dry mouth",
    "a temporary rash",
    "loose stools",
    "mild dizziness",
    "a burning feeling where it was applied",
    "reduced appetite",
    "drowsiness",
    "mild stomach discomfort",
]

DOSES = {
    "syrup": "Take 10 ml by mouth three times a day, after meals.",
    "tablet": "Take 2 tablets by mouth twice a day, with warm water.",
    "granule": "Dissolve 1 sachet in warm water and drink it twice a day, before meals.",
    "ointment": "Apply a thin layer to the affected skin two or three times a day.",
    "capsule": "Take 3 capsules by mouth three times a day, after meals.",
    "eye drop": "Put 1 or 2 drops into each eye four times a day.",
    "oral liquid": "Take 1 vial (10 ml) by mouth twice a day, in the morning and at noon.",
    "lozenge": "Let 1 lozenge dissolve slowly in the mouth every 2 hours, no more than 8 a day.",
    "suppository": "Insert 1 suppository into the rectum once or twice a day, after a bowel movement.",
    "herbal tea": "Steep 1 bag in boiling water for 10 minutes and drink it one hour before bed.",
    "nasal spray": "Spray once into each nostril three times a day.",
    "plaster": "Apply 1 plaster to clean, dry skin over the painful area and change it every 24 hours.",
    "powder": "Mix 1 sachet with warm water and take it three times a day, before meals.",
    "pill": "Take 8 pills by mouth three times a day, with warm water.",
    "mouthwash": "Rinse the mouth with 15 ml for 30 seconds twice a day after brushing; do not swallow.",
    "cream": "Rub a small amount into the cracked skin morning and evening.",
}

MAKERS = [
    "Halvern Pharmaceutical Co.",
    "Orrin Valley Remedies Ltd.",
    "Tessary Herbal Works",
    "Marrowgate Medicine Co.",
    "Ketterby Health Products",
]


def leaflet(index: int, product: tuple[str, str, str, str, list[str]]) -> dict[str, str]:
    name, form, symptoms, treats, ingredients = product
    rng = random.Random(index)
    precautions = rng.sample(PRECAUTIONS, 11)
    reactions = rng.sample(REACTIONS, 3)
    years = rng.choice([2, 3])
    maker = rng.choice(MAKERS)
    pack = rng.choice(["6", "12", "18", "24"])
    batch = f"TB{rng.randint(100000, 999999)}"
    lines = [
        f"For these symptoms, {name} is suitable. {name} is a {form} used for {treats}.",
        "",
        f"Name: {name}",
        "",
        f"Ingredients: {', '.join(ingredients)}. Excipients: purified water, starch and flavouring as "
        "needed.",
        "",
        f"Description: this product is a {form}. It has a faint herbal smell and a slightly bitter taste.",
        "",
        f"Functions and indications: {name} clears the cause of {treats} and relieves the discomfort that "
        "goes "
        f"with it. It is used for people whose main complaints are: {symptoms.rstrip('.').lower()}. It may "
        "also "
        f"be used to ease the same complaints when they return after a cold, after poor sleep or after a "
        f"period of stress.",
        "",
        f"Specification: each pack holds {pack} doses; batch number {batch}.",
        "",
        f"Usage and dosage: {DOSES[form]} A course of treatment is 7 days. Do not exceed the stated dose.",
        "",
        f"Adverse reactions: occasionally {reactions[0]}, {reactions[1]} or {reactions[2]} has been "
        "reported. "
        "These usually pass without treatment. If any reaction is severe or lasts, stop using the product "
        "and "
        "see a doctor.",
        "",
        f"Contraindications: people allergic to any ingredient of {name} must not use it. Pregnant women "
        "must "
        "not use it.",
        "",
        "Precautions:",
        *[f"{number}. {text}" for number, text in enumerate(precautions, 1)],
        "",
        "Drug interactions: using it together with other medicines may cause interactions; for details "
        "please "
        "consult a doctor or pharmacist.",
        "",
        f"Storage: keep {name} sealed, in a cool and dry place, below 25 degrees, away from light.",
        "",
        f"Packaging: a carton of {pack} doses, with this leaflet.",
        "",
        f"Validity: {years} years from the date of manufacture.",
        "",
        f"Manufacturer: {maker}",
        "",
        f"In short: for {symptoms.rstrip('.').lower()}, use {name} as directed above, and see a doctor if "
        "the symptoms do not improve.",
    ]
    return {"instruction": symptoms, "input": "", "output": "\n".join(lines)}


def main() -> None:
    rows = [leaflet(index, product) for index, product in enumerate(PRODUCTS)]
    OUT.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(rows)} rows to {OUT}")


if __name__ == "__main__":
    main()
