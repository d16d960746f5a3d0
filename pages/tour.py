"""Tour: the paper's story in six live steps on the sample zoos, for workshops."""

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from appkit.cache import cached_landscape, cached_pairs, cached_path, load_zoo, recipe_result, zoo_key
from appkit.sidebar import sidebar
from soup_core.evaluate import shift_average
from soup_core.recipes import RECIPES

sidebar()
st.title("Guided tour")
STEPS = ["1 · One basin", "2 · Angles", "3 · Uniform soups fail", "4 · Greedy and pruned soups",
         "5 · Scratch models", "6 · BatchNorm"]
step = st.radio("Step", STEPS, horizontal=True, key="tour-step")
finetune = load_zoo("digits-finetune")


def bars(zoo, recipes, title):
    names = [RECIPES[r].pretty_name for r in recipes]
    values = [100 * recipe_result(zoo, zoo_key(zoo), r).metrics["test"].accuracy for r in recipes]
    st.plotly_chart(go.Figure(go.Bar(x=names, y=values, text=[f"{v:.1f}" for v in values], textposition="outside"))
                    .update_layout(title=title, yaxis_title="test accuracy (%)", yaxis_range=[0, 105], height=420),
                    key=f"tour-bars-{title}")


if step == STEPS[0]:
    st.markdown("**Fine-tuned models share a basin** (paper Figure 2). Two models fine-tuned from the same "
                "pretrained θ0 with different hyperparameters, and θ0 itself, span a plane. The error is low "
                "between the two fine-tuned models: averaging their weights stays in the basin.")
    land = cached_landscape(finetune, zoo_key(finetune), ("base", "ft-03", "ft-17"), 15, "test", "recompute")
    fig = go.Figure(go.Contour(x=land["axes"]["x"], y=land["axes"]["y"], z=100 * np.array(land["error"]["test"]),
                               colorscale="Viridis", colorbar={"title": "test error %"}, contours={"showlabels": True}))
    fig.add_trace(go.Scatter(x=[a["xy"][0] for a in land["anchors"]], y=[a["xy"][1] for a in land["anchors"]],
                             text=[a["name"] for a in land["anchors"]], mode="markers+text", textposition="top center",
                             marker={"color": "red", "symbol": "star", "size": 12}))
    st.plotly_chart(fig.update_layout(height=520, yaxis={"scaleanchor": "x"}), key="tour-basin")
elif step == STEPS[1]:
    st.markdown("**More orthogonal solutions gain more from averaging?** (paper Figure 3). For each pair, the "
                "angle between θ1 − θ0 and θ2 − θ0 against the interpolation advantage "
                "acc(½θ1 + ½θ2) − ½(acc θ1 + acc θ2). The paper sees a positive correlation; check whether it "
                "holds on this zoo.")
    report = cached_pairs(finetune, zoo_key(finetune), tuple(finetune.names[:10]), "test")
    r = report["correlations"]["angle_vs_interpolation_advantage"]
    st.plotly_chart(go.Figure(go.Scatter(x=[p["angle_deg"] for p in report["pairs"]],
                                         y=[100 * p["interpolation_advantage"] for p in report["pairs"]],
                                         mode="markers"))
                    .update_layout(title=f"45 pairs of the first 10 models, r = {r:+.2f}", xaxis_title="angle (°)",
                                   yaxis_title="advantage (points)", height=420), key="tour-angles")
elif step == STEPS[2]:
    st.markdown("**Uniform soups fail when bad models join** (Table 3, Figure 1). A random hyperparameter "
                "search produces some models that are far from the basin; averaging all of them can be worse "
                "than the best single model.")
    bars(finetune, ["best", "uniform", "ensemble"], "digits-finetune: all 32 models")
elif step == STEPS[3]:
    st.markdown("**Greedy and pruned soups fix it** (Recipe 1; reproduction Algorithm 2). Greedy adds models in "
                "order of val accuracy only if val accuracy does not drop; pruned starts from all and removes "
                "models whose removal helps.")
    bars(finetune, ["best", "uniform", "greedy", "pruned"], "digits-finetune: recipes")
elif step == STEPS[4]:
    st.markdown("**Models trained from scratch do not soup** (paper §3.2 and the reproduction). Without a "
                "shared pretrained start, solutions lie in different basins and their average is near chance.")
    scratch = load_zoo("digits-scratch")
    bars(scratch, ["best", "uniform", "ensemble"], "digits-scratch: 8 models from random inits")
else:
    st.markdown("**BatchNorm** (reproduction: ResNet/EfficientNet soups collapsed). Running statistics belong to "
                "the weights they were measured with. Along the line θ0 → a fine-tuned CNN, compare keeping θ0's "
                "statistics, interpolating them, and recomputing them at every point.")
    bn_zoo = load_zoo("digits-bn")
    fig = go.Figure()
    for policy in ("recompute", "interpolate", "keep"):
        path = cached_path(bn_zoo, zoo_key(bn_zoo), "base", "bn-00", policy)
        fig.add_trace(go.Scatter(x=path["alphas"], y=100 * np.array(path["error"]["test"]), name=policy,
                                 mode="lines+markers"))
    st.plotly_chart(fig.update_layout(xaxis_title="α (θ0 → bn-00)", yaxis_title="test error (%)", height=420),
                    key="tour-bn")
    shifts = bn_zoo.evaluator.shift_names
    soup = recipe_result(bn_zoo, zoo_key(bn_zoo), "uniform").metrics
    st.caption(f"The uniform soup of all 12 BatchNorm models (statistics averaged): test "
               f"{100 * soup['test'].accuracy:.1f}%, shifts {100 * shift_average(soup, shifts):.1f}%.")
