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
  const luminance = rgb => {
    const [r, g, b] = rgb.map(v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const onWhite = e => {  // the text's contrast against the white paper it is drawn on (WCAG)
    const parts = getComputedStyle(e).fill.match(/[\d.]+/g).map(Number);
    const alpha = (parts.length > 3 ? parts[3] : 1) * parseFloat(getComputedStyle(e).fillOpacity || '1');
    const rgb = parts.slice(0, 3).map(v => v * alpha + 255 * (1 - alpha));
    return 1.05 / (luminance(rgb) + 0.05);
  };
  return [...document.querySelectorAll('.js-plotly-plot')].filter(shown).map(plot => {
    const full = plot._fullLayout || {};
    const holder = plot.closest('[data-testid=stElementContainer]') || plot.parentElement;
    const axes = [];
    for (const key of Object.keys(full)) {
      if (/^[xy]axis\d*$/.test(key) && full[key].visible !== false && full[key]._id) {
        // what is drawn, not the layout (Plotly fills an absent title with "Click to enter … title")
        const drawn = plot.querySelector(`.g-${full[key]._id}title`);
        axes.push([key, drawn ? drawn.textContent.trim() : '']);
      }
      if (/^scene\d*$/.test(key)) {
        for (const a of ['xaxis', 'yaxis', 'zaxis']) {
          axes.push([key + '.' + a, ((full[key][a].title || {}).text || '').trim()]);
        }
      }
    }
    const labels = [...plot.querySelectorAll('g.annotation-text-g, g.textpoint')].filter(shown)
        .map(e => ({text: e.textContent.trim().slice(0, 40), box: box(e)}));
    const markers = [...plot.querySelectorAll('.scatterlayer path.point')].filter(shown)
        .filter(e => opacity(e) > 0.2).map(box);
    const clashes = [];
    labels.forEach((label, i) => {
      labels.slice(i + 1).forEach(other => {
        if (overlap(label.box, other.box) > 4) clashes.push([label.text, other.text]);
      });
      markers.forEach(m => { if (overlap(label.box, m) > 4) clashes.push([label.text, 'a marker']); });
    });
    for (const axis of ['xtick', 'ytick']) {  // an axis's tick labels, each against the next
      const ticks = [...plot.querySelectorAll(`g.${axis} text`)].filter(shown)  // rotated boxes always overlap
          .filter(e => !/rotate\((?!0[,)])/.test(e.getAttribute('transform') || '')).map(box);
      if (ticks.some((tick, i) => ticks.slice(i + 1).some(other => overlap(tick, other) > 4))) {
        clashes.push([`${axis} labels`, 'each other']);
      }
    }
    const size = full._size, svg = plot.querySelector('svg.main-svg');
    let legendOverPlot = 0;
    const legend = plot.querySelector('g.legend');
    if (size && svg && legend && shown(legend) && !Object.keys(full).some(k => /^scene/.test(k))) {
      const s = svg.getBoundingClientRect();
      const area = [s.left + size.l, s.top + size.t, s.left + size.l + size.w, s.top + size.t + size.h];
      legendOverPlot = overlap(box(legend), area);
    }
    const texts = [...plot.querySelectorAll('g.xtick text, g.ytick text, .g-xtitle text, .g-ytitle text, '
        + '.legendtext, .cbaxis text, .cbtitle text')].filter(shown);
    const contrast = Math.min(...texts.map(onWhite), 21);
    return {width: plot.getBoundingClientRect().width, container: holder.getBoundingClientRect().width,
            axes, labels: labels.length, clashes, legendOverPlot, contrast};
  });
}
