"""Tour: the paper's story in eight live steps, each claim measured on the zoo it shows."""

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from appkit.board import board_recipes, chosen_on_val
from appkit.cache import (aligned_zoo, board_result, cached_barrier_interval, cached_barriers, cached_flattest_pair,
                          cached_landscape, cached_pairs, cached_path, load_zoo, recipe_result, recipe_significance,
                          zoo_key)
from appkit.figures import BLUE, LEGEND_ABOVE, VERMILION, figure_footer, label_points, plane_scale, scale_note, show
from appkit.plain import in_figure, literal
from appkit.room_controls import (HIDDEN_NOTE, follow_the_presenter, present_the_tour, test_hidden, unlock_facilitator,
                                  watch_the_presenter)
from appkit.sidebar import sidebar
from appkit.stories import batchnorm_story
from soup_core.io.lora import is_adapter_folder
from soup_core.pairs import section_four_sentence
from soup_core.recipes import RECIPES

ONE_BASIN = 0.01  # a line whose error barrier is under 1 point (6 of 630 test images) counts as one basin
STEPS = ["1 · One basin", "2 · Angles", "3 · Uniform soups", "4 · Greedy and pruned soups",
         "5 · Scratch models and alignment", "6 · BatchNorm", "7 · Soups and merge methods",
         "8 · Language models and adapters"]
LM_ZOO = "code-lm"  # step 8: next-token accuracy, and fine-tunings that are LoRA adapters

followed = follow_the_presenter()  # before the sidebar: the presenter's zoo
opened = sidebar()
st.title("Guided tour")


def move(by: int) -> None:
    st.session_state["tour-step"] = STEPS[(STEPS.index(st.session_state.get("tour-step", STEPS[0])) + by) % len(STEPS)]


if followed in STEPS:
    st.session_state["tour-step"] = followed
    st.info("Following the presenter's Tour.")
elif "tour-step" not in st.session_state and st.query_params.get("step", "") in map(str, range(1, len(STEPS) + 1)):
    st.session_state["tour-step"] = STEPS[int(st.query_params["step"]) - 1]  # a link to a step
step = st.radio("Step", STEPS, horizontal=True, key="tour-step")
step_number = STEPS.index(step) + 1
st.query_params["step"] = str(step_number)
if unlock_facilitator():
    present_the_tour(opened, step)
else:
    watch_the_presenter((opened.name, step))
back, forward, _ = st.columns([1, 1, 6])
back.button("← Back", on_click=move, args=(-1,), key="tour-back", disabled=step == STEPS[0])
forward.button("Next →", on_click=move, args=(1,), key="tour-next", disabled=step == STEPS[-1])
if test_hidden():  # every step's story is told on test
    st.info(HIDDEN_NOTE + " The Tour tells each step's story on test, so it continues once test is revealed.")
    st.stop()

# Steps 1–4 run on the open zoo when it can show them (θ0, held-out data with test); otherwise
# on digits-finetune. Steps 5 and 6 need a zoo trained from scratch and one with BatchNorm.
story_zoo = opened if (opened.has_base and opened.evaluator is not None and "test" in opened.evaluator.splits
                       and len(opened.names) >= 3) else load_zoo("digits-finetune")


def uses(zoo, why: str = "") -> None:
    st.info(f"This step uses the zoo **{literal(zoo.name)}**{why}.")


def versus(zoo, recipe: str, against: str = "best") -> dict:
    """The recipe against the best individual model (or ``against``'s soup) on test (exact McNemar test)."""
    return next(c for c in recipe_significance(zoo, zoo_key(zoo), recipe, against) if c["split"] == "test")


def bars(zoo, recipes, title, extra: tuple = ()) -> None:
    """Test accuracy of each recipe on ``zoo``, then any ``extra`` (label, zoo, recipe) bars."""
    rows = [(RECIPES[r].pretty_name, zoo, r) for r in recipes] + list(extra)
    names = [label for label, _, _ in rows]
    values = [100 * board_result(z, r).metrics["test"].accuracy for _, z, r in rows]
    # Near the lowest bar when the bars are close (small differences show); at 0 when one is far below the
    # others, which a cut axis would draw as if it were nothing.
    close = max(values) - min(values) <= 20
    low = max(0.0, min(values) - 5) if close else 0.0
    fig = go.Figure(go.Bar(x=names, y=values, text=[f"{v:.1f}%" for v in values], textposition="outside"))
    fig.update_layout(title=title, xaxis_title="recipe", yaxis_title="test accuracy (%)", yaxis_range=[low, 101],
                      height=440, margin={"t": 50})
    show(fig, key=f"tour-bars-{title}")
    figure_footer(f"tour-{step_number}", "each bar is one recipe's accuracy on the test split; every choice was made "
                  "on val. " + ("The axis starts near the lowest bar so that small differences show." if close else
                                "The axis starts at 0: the bars differ by more than 20 points."),
                  pd.DataFrame({"soup": names, "test accuracy (%)": values}), figure=fig)


if step == STEPS[0]:
    zoo = story_zoo
    uses(zoo)
    a, b, _ = cached_flattest_pair(zoo, zoo_key(zoo))
    line = cached_barrier_interval(zoo, zoo_key(zoo), a, b, "test")
    barrier, low, high = line.barrier, line.low, line.high
    measured = (f"**{100 * barrier:.1f} points** above the straight line between their test errors (95% interval "
                f"{100 * low:.1f} to {100 * high:.1f} points over the {len(zoo.evaluator.splits['test'])} "
                "test images)")
    verdict = (f"The error stays low on the line between them — at most {measured} — so averaging their weights "
               "stays in the basin." if high < ONE_BASIN else
               f"Even for them the error rises {measured}: on this zoo they sit in different basins, and the "
               "paper's picture does not show." if low >= ONE_BASIN else
               f"The error rises {measured}. This step calls a line with a barrier under 1 point one basin; the "
               "interval holds values on both sides of that, so these test images cannot tell one basin from two.")
    st.markdown(f"**Fine-tuned models share a basin?** (paper Figure 2). Of the good models (the six best on val), "
                f"**{literal(a)}** and **{literal(b)}** have the flattest line between them (chosen on val). With θ0 "
                f"they span the plane below. {verdict}")
    alphas, errors, chord = line.alphas, 100 * line.error, 100 * line.chord
    worst = int(np.argmax(errors - chord))
    figure = go.Figure([go.Scatter(x=alphas.tolist(), y=errors.tolist(), mode="lines+markers",
                                   name="error of the averaged weights"),
                        go.Scatter(x=alphas.tolist(), y=chord.tolist(), mode="lines",
                                   line={"dash": "dot", "color": "gray"}, name="straight line between their errors")])
    figure.add_annotation(x=float(alphas[worst]), y=float(errors[worst]), text=f"barrier {100 * barrier:.1f} points",
                          showarrow=True, arrowhead=2)
    figure.update_layout(height=360, xaxis_title=f"α: (1 − α)·{in_figure(a)} + α·{in_figure(b)}", yaxis_title="test error (%)",
                         margin={"t": 20})
    show(figure, key="tour-basin-line")
    figure_footer("tour-1-line", f"the barrier in words above is the largest gap between the error of "
                  f"(1 − α)·{literal(a)} + α·{literal(b)} (blue) and the straight line between the two models' own "
                  "errors (grey).",
                  pd.DataFrame({"alpha": alphas, "test error (%)": errors, "straight line (%)": chord}), figure=figure)
    land = cached_landscape(zoo, zoo_key(zoo), ("base", a, b), 15, "test", "recompute")
    z = 100 * np.array(land["error"]["test"])
    fig = go.Figure(go.Contour(x=land["axes"]["x"], y=land["axes"]["y"], z=z, colorscale="Viridis", ncontours=30,
                               colorbar={"title": "test error (%)"}, contours={"showlabels": True}))
    ends = {p["name"]: p["xy"] for p in land["anchors"]}
    fig.add_trace(go.Scatter(x=[ends[a][0], ends[b][0]], y=[ends[a][1], ends[b][1]], mode="lines",
                             line={"color": "white", "width": 3, "dash": "dash"},
                             name=f"the line between {in_figure(a)} and {in_figure(b)} (the plot above)"))
    fig.add_trace(go.Scatter(x=[p["xy"][0] for p in land["anchors"]], y=[p["xy"][1] for p in land["anchors"]],
                             hovertext=[in_figure(p["name"]) for p in land["anchors"]], hoverinfo="text", mode="markers",
                             marker={"color": "red", "symbol": "star", "size": 12}, name="the three points"))
    label_points(fig, [(p["name"], p["xy"]) for p in land["anchors"]],
                 extent=((land["axes"]["x"][0], land["axes"]["x"][-1]), (land["axes"]["y"][0], land["axes"]["y"][-1])))
    spans = float(np.ptp(land["axes"]["x"])), float(np.ptp(land["axes"]["y"]))
    equal, height = plane_scale(*spans)
    show(fig.update_layout(height=height, yaxis={"scaleanchor": "x"} if equal else {}, xaxis_title="x (L2 distance)",
                           yaxis_title="y (L2 distance)", legend=LEGEND_ABOVE, margin={"t": 40}), key="tour-basin")
    gx, gy = np.meshgrid(land["axes"]["x"], land["axes"]["y"])
    figure_footer("tour-1", f"colour is test error (%) in the plane through θ0 (base), {literal(a)} and "
                  f"{literal(b)}; axes are distances in weight space; about 30 levels, so bumps of a few points "
                  f"show. The dashed white line is the straight segment between {literal(a)} and {literal(b)} whose "
                  "errors the plot above follows." + scale_note(*spans),
                  pd.DataFrame({"x": gx.ravel(), "y": gy.ravel(), "test error (%)": z.ravel()}), figure=fig)
elif step == STEPS[1]:

    zoo = story_zoo
    uses(zoo)
    names = tuple(zoo.names[:10])
    report = cached_pairs(zoo, zoo_key(zoo), names, "test")
    r = report["correlations"]["angle_vs_interpolation_advantage"]
    holds = ("n/a (too few pairs)" if r is None else
             f"r = {r:+.2f}: " + ("the same trend as the paper" if r > 0.3 else
                                  "no positive trend here" if r > -0.3 else "the opposite trend here"))
    st.markdown("**More orthogonal solutions gain more from averaging?** (paper Figure 3). For each pair, the angle "
                "between θ1 − θ0 and θ2 − θ0 against the interpolation advantage acc(½θ1 + ½θ2) − ½(acc θ1 + acc "
                f"θ2). The paper sees a positive correlation; on {zoo.name}, {holds}.")
    frame = pd.DataFrame({"a": [p["a"] for p in report["pairs"]], "b": [p["b"] for p in report["pairs"]],
                          "angle (degrees)": [p["angle_deg"] for p in report["pairs"]],
                          "advantage (points)": [100 * p["interpolation_advantage"] for p in report["pairs"]]})
    fig = go.Figure(go.Scatter(x=frame["angle (degrees)"], y=frame["advantage (points)"], mode="markers",
                               text=frame["a"].map(in_figure) + " × " + frame["b"].map(in_figure)))
    fig.update_layout(title=f"{len(report['pairs'])} pairs of the first {len(names)} models",
                      xaxis_title="angle between θ1 − θ0 and θ2 − θ0 (degrees)",
                      yaxis_title="interpolation advantage (test accuracy points)", height=420)
    show(fig, key="tour-angles")
    figure_footer("tour-2", "one dot per pair of models: right is a wider angle between their updates, up is more "
                  "gained by averaging the two than by their mean accuracy.", frame, figure=fig)
    st.markdown(section_four_sentence(report))  # from the same pairs
elif step == STEPS[2]:
    zoo = story_zoo
    uses(zoo)
    c = versus(zoo, "uniform")
    claim = ("Averaging all of them is worse than the best single model" if c["significant"] and c["difference"] < 0
             else "Here averaging all of them is not worse than the best single model")
    st.markdown(f"**Uniform soups fail when bad models join?** (Table 3, Figure 1). A hyperparameter sweep produces "
                f"some models far from the basin. {claim}: the uniform soup of all {len(zoo.names)} against "
                f"the {literal(c['a'])} on test, {c['sentence']}.")
    bars(zoo, ["best", "uniform", "ensemble"], f"{zoo.name}: all {len(zoo.names)} models")
elif step == STEPS[3]:
    zoo = story_zoo
    uses(zoo)
    lines = []
    for recipe in ("greedy", "pruned"):
        c, name = versus(zoo, recipe), RECIPES[recipe].pretty_name
        gap = (f"{abs(100 * c['difference']):.1f} points {'above' if c['difference'] > 0 else 'below'}"
               if c["difference"] else "level with")
        verdict = ("a significant difference" if c["significant"] else
                   f"not significant, so these {c['predictions']} {c['unit']} cannot tell the two apart")
        lines.append(f"- {name}: {gap} the {literal(c['a'])} on test; {verdict} (exact McNemar test, "
                     f"p = {c['p_value']:.2g}).")
    uniform = recipe_result(zoo, zoo_key(zoo), "uniform").metrics["test"].accuracy
    greedy = recipe_result(zoo, zoo_key(zoo), "greedy").metrics["test"].accuracy
    st.markdown("**Greedy and pruned soups** (Recipe 1; reproduction Algorithm 2). Greedy adds models in order of val "
                "accuracy only if val accuracy does not drop; pruned starts from all and removes models whose "
                f"removal does not hurt val. Against the uniform soup: greedy is "
                f"{100 * (greedy - uniform):+.1f} points on test. Against the best single model:\n" + "\n".join(lines))
    bars(zoo, ["best", "uniform", "greedy", "pruned"], f"{zoo.name}: recipes")
elif step == STEPS[4]:
    scratch = load_zoo("digits-scratch")
    uses(scratch, " (models trained from different random initialisations)")
    c = versus(scratch, "uniform")
    reference = scratch.names[0]
    matched = aligned_zoo(scratch, zoo_key(scratch), reference)
    after = versus(matched, "uniform")
    table = cached_barriers(scratch, zoo_key(scratch), reference, "test")
    before_barrier = 100 * np.mean([row["before"] for row in table])
    after_barrier = 100 * np.mean([row["after"] for row in table])
    st.markdown("**Models trained from scratch do not soup — until their units are matched** (paper §3.2; Ainsworth "
                f"et al. 2023). Without a shared pretrained start, solutions lie in different basins: here the "
                f"uniform soup of all {len(scratch.names)} scores {100 * c['accuracy_b']:.1f}% on test against "
                f"{100 * c['accuracy_a']:.1f}% for the {literal(c['a'])}, and the error rises on average "
                f"**{before_barrier:.1f} points** above the straight line between two of them. A network's hidden "
                f"units can be listed in any order without changing what it computes; permuting each model's units "
                f"to match {literal(reference)}'s (weight matching) brings the average barrier down to "
                f"**{after_barrier:.1f} points**, and the uniform soup of the aligned models scores "
                f"{100 * after['accuracy_b']:.1f}% ({after['sentence']} against the best model).")
    bars(scratch, ["best", "uniform", "ensemble"], f"digits-scratch: {len(scratch.names)} models from random inits",
         extra=((f"Uniform soup, aligned to {reference}", matched, "uniform"),))
    pairs = [f"{in_figure(row['a'])} × {in_figure(row['b'])}" for row in table]
    barriers = go.Figure([go.Bar(x=pairs, y=[100 * row["before"] for row in table], name="as trained",
                                 marker_color=VERMILION),
                          go.Bar(x=pairs, y=[100 * row["after"] for row in table], name=f"aligned to {reference}",
                                 marker_color=BLUE)])
    barriers.update_layout(barmode="group", height=380, yaxis_title="test error barrier (points)",
                           xaxis_title="pair of models", legend=LEGEND_ABOVE,
                           margin={"t": 40})
    show(barriers, key="tour-5-barriers")
    figure_footer("tour-5-barriers", f"each pair's error barrier on test (how far the error rises above the straight "
                  f"line between the two models' own errors), as trained and after aligning to {literal(reference)}; "
                  f"their means are the {before_barrier:.1f} and {after_barrier:.1f} points in the text.",
                  pd.DataFrame(table), figure=barriers)
elif step == STEPS[6]:
    zoo = story_zoo
    uses(zoo)
    methods = [r.name for r in board_recipes(zoo) if r.family == "merge" and r.is_soup]
    made = {m: board_result(zoo, m) for m in methods}
    top = max(methods, key=lambda m: made[m].metrics["val"].accuracy)  # chosen on val, like everything else
    against = {m: versus(zoo, m, "greedy") for m in methods}
    better = [m for m in methods if against[m]["significant"] and against[m]["difference"] > 0]
    worse = [m for m in methods if against[m]["significant"] and against[m]["difference"] < 0]
    top_m = made[top].metrics
    st.markdown(
        "**Soups and merge methods** (Ilharco et al. 2023; Yadav et al. 2023; Yu et al. 2024; Davari & Belilovsky "
        "2024; Wang et al. 2024). Beyond averaging, the field merges *task vectors*, each model's change from θ0: "
        "task arithmetic adds their mean, TIES keeps each one's largest entries and the sign most of them vote "
        "for, DARE drops entries at random and rescales the rest, Breadcrumbs drops the largest and the smallest, "
        "the Karcher mean averages on the sphere, WiSE-FT and LiNeS pull the soup back towards θ0 (LiNeS less in "
        "the deep layers). The task vectors' scale λ (LiNeS: β) is chosen on val"
        + (f"; WiSE-FT takes α = {made['wise-ft'].options['alpha']:g}. " if "wise-ft" in made else ". ")
        + f"On this zoo the method best on val is **{RECIPES[top].pretty_name}**"
        + (f" ({chosen_on_val(made[top])})" if chosen_on_val(made[top]) != "—" else "")
        + f": {100 * top_m['val'].accuracy:.1f}% on val and {100 * top_m['test'].accuracy:.1f}% on test; against "
        f"the greedy soup on test, {against[top]['sentence']}. Of the {len(methods)} methods, "
        f"{len(worse)} are significantly worse than the greedy soup on test, {len(better)} significantly better, "
        f"and {len(methods) - len(worse) - len(better)} cannot be told apart from it on these "
        f"{against[top]['predictions']} {against[top]['unit']}. The Landscape page draws each of them on a plane.")
    bars(zoo, ["best", "greedy", *methods], f"{zoo.name}: soups and merge methods")
elif step == STEPS[7]:
    lm = load_zoo(LM_ZOO)
    uses(lm, " (GPT-2 and its fine-tunings on Python's own source text)")
    adapters = [n for n in lm.names if is_adapter_folder(lm.path(n))]
    against = {c["split"]: c for c in recipe_significance(lm, zoo_key(lm), "uniform")}
    shifts = [s for s in lm.evaluator.shift_names if s in against]
    test = against["test"]
    st.markdown(
        f"**Language models and LoRA adapters** (what the digits cannot show). {literal(lm.name)} is a GPT-2 of "
        f"{sum(t.numel() for t in lm.base.values()) / 1e6:.2f} M parameters; of its {len(lm.names)} fine-tunings, "
        f"{len(adapters)} are LoRA adapters, each an update B·A of θ0 in a few modules, and "
        f"{len(lm.names) - len(adapters)} are full fine-tunings. A soup averages the adapters' *updates* B·A, "
        "exactly; averaging the A and the B matrices apart (PEFT's add_weighted_adapter) adds cross terms. "
        f"Every next token is one prediction: accuracy is next-token accuracy over the "
        f"{test['predictions']} {test['unit']} of test. The uniform soup of all {len(lm.names)} against the "
        f"{literal(test['a'])}: on test, {test['sentence']}; "
        + "; ".join(f"on the shift {literal(s)}, {against[s]['sentence']}" for s in shifts)
        + ". The test counts tokens as independent; the tokens of one sequence tend to err together, so these "
        "p-values overstate the evidence.")
    bars(lm, ["best", "uniform", "greedy", "ensemble"], f"{lm.name}: {len(lm.names)} fine-tunings of a language model")
else:
    bn_zoo = load_zoo("digits-bn")
    uses(bn_zoo, " (a CNN with BatchNorm)")
    first = bn_zoo.names[0]
    fig, errors = go.Figure(), {}
    for policy in ("recompute", "interpolate", "keep"):
        path = cached_path(bn_zoo, zoo_key(bn_zoo), "base", first, policy, 0.0, 1.0, 11)
        alphas, errors[policy] = path["alphas"], 100 * np.array(path["error"]["test"])
        fig.add_trace(go.Scatter(x=alphas, y=errors[policy], name=policy, mode="lines+markers"))
    st.markdown(batchnorm_story(errors, literal(first)))
    show(fig.update_layout(xaxis_title=f"α (θ0 → {in_figure(first)})", yaxis_title="test error (%)", height=420),
         key="tour-bn")
    soup = recipe_result(bn_zoo, zoo_key(bn_zoo), "uniform").metrics
    figure_footer("tour-6", f"each line is one way to treat BatchNorm statistics along the line. The uniform soup of "
                  f"all {len(bn_zoo.names)} BatchNorm models (statistics averaged) scores "
                  f"{100 * soup['test'].accuracy:.1f}% on test.",
                  pd.DataFrame({"alpha": alphas, **{f"{p}: test error (%)": e for p, e in errors.items()}}), figure=fig)
