// What a participant sees of every plotly figure on the page, measured in the browser (issue 26):
// each plot's width and its container's, its axes' titles, its labels' boxes against each other and
// against the markers that can be seen, and its legend against the plotting area.
() => {
  const shown = e => { const r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
  const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const overlap = (a, b) => Math.max(0, Math.min(a[2], b[2]) - Math.max(a[0], b[0]))
      * Math.max(0, Math.min(a[3], b[3]) - Math.max(a[1], b[1]));
  const opacity = e => {
    let o = 1;
    for (let n = e; n && n.tagName !== 'svg'; n = n.parentElement) {
      o *= parseFloat(getComputedStyle(n).opacity || '1');
      if (n.getAttribute('opacity')) o *= parseFloat(n.getAttribute('opacity'));
    }
    return o;
  };
  return [...document.querySelectorAll('.js-plotly-plot')].filter(shown).map(plot => {
    const full = plot._fullLayout || {};
    const holder = plot.closest('[data-testid=stElementContainer]') || plot.parentElement;
    const axes = [];
    for (const key of Object.keys(full)) {
      if (/^[xy]axis\d*$/.test(key) && full[key].visible !== false && full[key]._id) {
        axes.push([key, ((full[key].title || {}).text || '').trim()]);
      }
      if (/^scene\d*$/.test(key)) {
        for (const a of ['xaxis', 'yaxis', 'zaxis']) axes.push([key + '.' + a, ((full[key][a].title || {}).text || '').trim()]);
      }
    }
    const labels = [...plot.querySelectorAll('g.annotation-text-g, g.textpoint')].filter(shown)
        .map(e => ({text: e.textContent.trim().slice(0, 40), box: box(e)}));
    const markers = [...plot.querySelectorAll('.scatterlayer path.point')].filter(shown)
        .filter(e => opacity(e) > 0.2).map(box);
    const clashes = [];
    labels.forEach((label, i) => {
      labels.slice(i + 1).forEach(other => { if (overlap(label.box, other.box) > 4) clashes.push([label.text, other.text]); });
      markers.forEach(m => { if (overlap(label.box, m) > 4) clashes.push([label.text, 'a marker']); });
    });
    const size = full._size, svg = plot.querySelector('svg.main-svg');
    let legendOverPlot = 0;
    const legend = plot.querySelector('g.legend');
    if (size && svg && legend && shown(legend) && !Object.keys(full).some(k => /^scene/.test(k))) {
      const s = svg.getBoundingClientRect();
      legendOverPlot = overlap(box(legend), [s.left + size.l, s.top + size.t, s.left + size.l + size.w, s.top + size.t + size.h]);
    }
    return {width: plot.getBoundingClientRect().width, container: holder.getBoundingClientRect().width,
            axes, labels: labels.length, clashes, legendOverPlot};
  });
}
