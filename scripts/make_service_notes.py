"""Write data/examples/service_notes.json: 16 made-up appliance faults, each a question describing what a
machine does wrong and a long service note (610-635 tokens with the bundled model) that names the part to
fit in its first sentence. A second long-answer set beside the leaflets, written apart from them and never
used to choose Tuneboard's defaults: `python -m bench --only leaflets` checks that a default run names the
right part for the training rows. Deterministic: `python scripts/make_service_notes.py` rewrites the file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "examples" / "service_notes.json"

# (part to fit, machine, the fault as the owner describes it, what has failed)
FAULTS = [
    (
        "Tarnwell Drain Pump",
        "washing machine",
        "The washing machine stops mid-cycle with water left in the drum.",
        "the drain pump impeller",
    ),
    (
        "Ossory Door Seal",
        "dishwasher",
        "Water leaks from the bottom of the dishwasher door during the wash.",
        "the door gasket",
    ),
    (
        "Keldane Thermostat",
        "oven",
        "The oven never gets hotter than about 120 degrees.",
        "the oven thermostat",
    ),
    (
        "Brumley Fan Motor",
        "fridge",
        "The fridge is warm at the top and the freezer ices up.",
        "the evaporator fan motor",
    ),
    (
        "Vessick Heating Element",
        "kettle",
        "The kettle switches on but the water never boils.",
        "the heating element",
    ),
    (
        "Arlow Carbon Brushes",
        "vacuum cleaner",
        "The vacuum cleaner sparks at the vents and loses power.",
        "the motor's carbon brushes",
    ),
    (
        "Pennick Belt",
        "tumble dryer",
        "The tumble dryer runs and heats but the drum does not turn.",
        "the drum belt",
    ),
    (
        "Quorra Inlet Valve",
        "washing machine",
        "The washing machine fills very slowly and shows a water error.",
        "the water inlet valve",
    ),
    ("Restow Igniter", "gas hob", "One burner on the gas hob clicks but never lights.", "the burner igniter"),
    (
        "Selvin Door Switch",
        "microwave",
        "The microwave light comes on but it does not heat the food.",
        "the door interlock switch",
    ),
    (
        "Thrale Pressure Switch",
        "boiler",
        "The boiler fires for a minute and then locks out.",
        "the air pressure switch",
    ),
    (
        "Ulvane Gear Set",
        "food mixer",
        "The food mixer motor hums but the beaters barely move.",
        "the planetary gear set",
    ),
    (
        "Wexley Filter Housing",
        "coffee machine",
        "The coffee machine drips slowly and the coffee is cold.",
        "the water filter housing",
    ),
    (
        "Yarrow Control Board",
        "air conditioner",
        "The air conditioner beeps three times and will not start.",
        "the main control board",
    ),
    (
        "Zennor Hinge Kit",
        "fridge freezer",
        "The fridge freezer door drops and does not close by itself.",
        "the door hinge kit",
    ),
    (
        "Corrib Shock Absorbers",
        "washing machine",
        "The washing machine bangs and walks across the floor when it spins.",
        "the drum shock absorbers",
    ),
]

TOOLS = [
    "a cross-head screwdriver",
    "a 7 mm nut driver",
    "a multimeter",
    "needle-nose pliers",
    "a torch",
    "a flat-blade screwdriver",
    "an old towel",
    "a shallow tray",
    "insulated gloves",
    "a socket set",
    "a putty knife",
    "cable ties",
]

CHECKS = [
    "Listen for rubbing or knocking noises in the first five minutes.",
    "Look under the machine with a torch for any drips.",
    "Check that the door or lid closes without force.",
    "Confirm that no warning light shows on the panel.",
    "Feel the outer casing after ten minutes: it should be no more than warm.",
    "Run the shortest programme once with the machine empty.",
    "Make sure the power cable is not trapped when the machine is pushed back.",
    "Note the time the programme takes and compare it with the manual.",
    "Check that every screw removed has gone back in.",
    "Wipe away any dust or fluff disturbed during the repair.",
]


def note(index: int, fault: tuple[str, str, str, str]) -> dict[str, str]:
    part, machine, complaint, failed = fault
    rng = random.Random(1000 + index)
    code = f"SN-{rng.randint(1000, 9999)}-{rng.choice('ABCDEFGH')}"
    tools = rng.sample(TOOLS, 5)
    checks = rng.sample(CHECKS, 6)
    minutes = rng.choice([30, 45, 60, 90])
    screws = rng.randint(4, 10)
    months = rng.choice([6, 12, 24])
    lines = [
        f"For this fault, fit the {part} (part {code}). The symptom points to {failed}, which has worn out "
        f"and stops the {machine} from working as it should.",
        "",
        f"Part: {part}, service code {code}, made for domestic {machine}s of the last ten years.",
        "",
        f"Time needed: about {minutes} minutes for someone who has used the tools before.",
        "",
        f"Tools: {', '.join(tools)}.",
        "",
        "Safety first: switch the machine off at the wall and pull out the plug. Turn off the water or gas "
        "supply where there is one. Wait at least ten minutes for any stored heat or charge to fade. Wear "
        "gloves: edges inside the casing can be sharp.",
        "",
        "Getting access:",
        f"1. Pull the {machine} forward until you can reach the back panel.",
        f"2. Remove the {screws} screws that hold the panel and lift it away. Keep the screws in a tray.",
        f"3. Take a photograph of the wiring around {failed} before you touch anything.",
        "4. Lay a towel under the work area to catch water or small parts.",
        "",
        "Replacing the part:",
        f"5. Disconnect the connectors from {failed}, pressing the release tab on each one.",
        "6. Undo the fixing screws or clips and ease the old part out without forcing it.",
        f"7. Compare the old part with the {part}: the mounting points should line up exactly.",
        f"8. Fit the {part} in the same position and tighten its fixings firmly but not hard.",
        "9. Reconnect every connector as it was in your photograph; each one should click home.",
        "10. Refit the back panel and all of its screws.",
        "",
        "Testing:",
        *[f"- {check}" for check in checks],
        "",
        "If the fault returns: switch off again and check the connectors first; a loose connector causes "
        "most repeat faults. If they are sound, the machine needs a qualified engineer.",
        "",
        f"Warranty: the part carries a {months}-month warranty from the date of purchase. Keep the receipt "
        "and the old part until the machine has run normally for a week.",
        "",
        "Disposal: take the old part to a local recycling point for electrical items; do not put it in "
        "household waste.",
        "",
        f"In short: {complaint[0].lower() + complaint[1:]} Fit the {part}, test the {machine} as above, and "
        "call an engineer if the fault comes back.",
    ]
    return {"instruction": complaint, "input": "", "output": "\n".join(lines)}


def main() -> None:
    rows = [note(index, fault) for index, fault in enumerate(FAULTS)]
    OUT.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(rows)} rows to {OUT}")


if __name__ == "__main__":
    main()
